"""Small-talk conversations from two permissively licensed PyPI packages (DATA.md 6b).

  ChitChat    chitchat-dataset==0.9.0 (MIT): 7,168 human-human chats, each a list of turns,
              each turn one sender's consecutive utterances. Empty utterances are dropped, a
              turn's utterances are joined with newlines, the first sender is the user and roles
              alternate. Chats with fewer than two turns are dropped and a trailing user turn is
              cut (nothing to learn from it): 4,017 conversations.
  ChatterBot  chatterbot-corpus==1.3.3 (BSD-3), English files: short canned exchanges
              alternating user/assistant. botprofile.yml and ai.yml are left out: they speak
              as the ChatterBot persona ("I am written in Python"), which would contradict the
              identity task. Exact duplicate conversations are kept once: 774 conversations.
Both are training data only (no evaluation).
"""

import functools
import json
import zipfile
from pathlib import Path

import yaml

from nanopipe.data.offline_packages import PypiFile, package_path
from nanopipe.tasks.base import Task, package_provenance, shuffled

CHITCHAT = PypiFile(
    "chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    "MIT",
)
CHATTERBOT = PypiFile(
    "chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    "BSD-3-Clause",
)
CHITCHAT_MEMBER = "chitchat_dataset/dataset.json"
CHATTERBOT_DIR = "chatterbot_corpus/data/english/"
CHATTERBOT_EXCLUDED = ("botprofile.yml", "ai.yml")


def _alternating(turns: list[str]) -> list[dict] | None:
    """Turns (first = user) as messages ending with the assistant; None if under one exchange."""
    turns = turns[: len(turns) // 2 * 2]
    if not turns:
        return None
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


@functools.lru_cache(maxsize=None)
def load_chitchat(path: Path) -> tuple[tuple[str, tuple], ...]:
    """(conversation id, messages) in file order."""
    with zipfile.ZipFile(path) as z:
        data = json.loads(z.read(CHITCHAT_MEMBER))
    out = []
    for conv_id, conv in data.items():
        turns: list[tuple[str, str]] = []  # (sender, text), merged so that senders alternate
        for turn in conv["messages"]:
            for utterance in turn:
                text = utterance["text"].strip()
                if not text:
                    continue  # a few utterances are empty
                if turns and turns[-1][0] == utterance["sender"]:
                    turns[-1] = (utterance["sender"], turns[-1][1] + "\n" + text)
                else:
                    turns.append((utterance["sender"], text))
        messages = _alternating([text for _, text in turns])
        if messages is not None:
            out.append((conv_id, tuple(messages)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def load_chatterbot(path: Path) -> tuple[tuple[str, tuple], ...]:
    """(file name, messages) for the English files, in file-name order, duplicates removed."""
    out, seen = [], set()
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(CHATTERBOT_DIR) and n.endswith(".yml"))
        for name in names:
            if name.rsplit("/", 1)[1] in CHATTERBOT_EXCLUDED:
                continue
            doc = yaml.safe_load(z.read(name))
            for conv in doc["conversations"]:
                # one entry of trivia.yml lacks a dash and parses as a plain string: not a conversation
                if not isinstance(conv, list) or not all(isinstance(u, str) and u.strip() for u in conv):
                    continue
                texts = [u.strip() for u in conv]
                messages = _alternating(texts)
                if messages is None or tuple(texts) in seen:
                    continue
                seen.add(tuple(texts))
                out.append((name.rsplit("/", 1)[1], tuple(messages)))
    return tuple(out)


class _Conversations(Task):
    _package: PypiFile
    _member: str

    def __init__(self, cache_dir: str | Path | None = None, **view):
        super().__init__(**view)
        self.rows = shuffled(self._load(package_path(self._package, cache_dir)))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        source, messages = self.rows[index]
        return {"messages": [dict(m) for m in messages], "source": source}

    def provenance(self) -> dict:
        return {**super().provenance(), "source": package_provenance(self._package, path=self._member)}


class ChitChat(_Conversations):
    _package, _member = CHITCHAT, CHITCHAT_MEMBER
    _load = staticmethod(load_chitchat)


class ChatterBot(_Conversations):
    _package, _member = CHATTERBOT, CHATTERBOT_DIR
    _load = staticmethod(load_chatterbot)
