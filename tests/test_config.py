import pytest

from nanopipe.config import PRESETS, ConfigError, load_config


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset


def test_d20_is_the_seed_recipe():
    cfg = load_config("d20")
    assert cfg.base_train.depth == 20 and cfg.tokenizer.vocab_size == 65_536
    assert cfg.base_train.target_param_data_ratio == 20 and cfg.base_train.nproc_per_node == 8


def test_dotted_overrides_parse_json_values():
    cfg = load_config("tiny", ["base_train.depth=6", "data.docs_per_shard=4", "tokenizer.source.kind=local",
                               'tokenizer.source.paths=["a.txt"]', "base_train.compile=true"])
    assert cfg.base_train.depth == 6 and cfg.data.docs_per_shard == 4
    assert cfg.tokenizer.source.paths == ["a.txt"] and cfg.base_train.compile is True


@pytest.mark.parametrize("override, needle", [
    ("base_train.depth=-1", "base_train.depth"),
    ("base_train.depth=abc", "base_train.depth"),
    ("data.nope=1", "data has no field 'nope'"),
    ("nosection.x=1", "no field 'nosection'"),
    ("depth=3", "section.field"),
    ("base_train.depth", "section.field=value"),
    ("data.docs_per_shard.x=1", "is a value, not a section"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config("tiny", [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")


def test_overrides_touch_only_their_section_and_not_the_presets():
    cfg = load_config("tiny", ["data.source.kind=local", 'data.source.paths=["x.txt"]', "data.source.doc_chars=null"])
    assert cfg.data.source.kind == "local" and cfg.tokenizer.source.kind == "sample"
    assert load_config("tiny").data.source.kind == "sample"


def test_pretraining_documents_are_never_truncated():
    # the sample's doc_chars splits its long works into pieces (nothing is lost); any other source's would cut
    with pytest.raises(ConfigError, match=r"would truncate local pretraining documents .* data.source.doc_chars=null"):
        load_config("tiny", ["data.source.kind=local", 'data.source.paths=["x.txt"]'])
    for preset in ("d20", "d26", "d32"):
        assert load_config(preset).data.source.doc_chars is None
