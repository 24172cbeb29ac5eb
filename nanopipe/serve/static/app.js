// The chat page: keeps the conversation in memory, streams replies from POST /chat/completions
// (server-sent events: {"text": ...} pieces, then {"done": true, ...} or {"error": ...}).
// A server started with an API key: the key comes from the URL fragment (#key=...), which is
// then removed from the address bar, or from the key field; it is kept for this tab only.
"use strict";

const conversationEl = document.getElementById("conversation");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
let messages = [];
let controller = null; // aborts the reply in flight on "New chat"
const keyInput = document.getElementById("api-key");

function takeKeyFromFragment() {
  const match = /(?:^#|&)key=([^&]*)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("nanopipe-api-key", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  keyInput.value = sessionStorage.getItem("nanopipe-api-key") || "";
}

function showKeyField() {
  keyInput.parentElement.hidden = false;
}

keyInput.addEventListener("change", () => sessionStorage.setItem("nanopipe-api-key", keyInput.value.trim()));

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text; // never innerHTML: model output is untrusted text
  conversationEl.appendChild(div);
  conversationEl.scrollTop = conversationEl.scrollHeight;
  return div;
}

function numberOr(id, fallback) {
  const v = parseFloat(document.getElementById(id).value);
  return Number.isFinite(v) ? v : fallback;
}

async function showModel() {
  try {
    const health = await (await fetch("/health")).json();
    document.getElementById("model").textContent = health.model;
    document.getElementById("top-k").max = health.vocab_size;
    if (health.auth_required && !keyInput.value) showKeyField();
  } catch (e) {
    document.getElementById("model").textContent = "server unreachable";
  }
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant streaming", "");
  sendButton.disabled = true;
  controller = new AbortController();
  const body = {
    messages: messages,
    temperature: numberOr("temperature", 0.8),
    top_k: Math.round(numberOr("top-k", 50)),
  };
  let answer = "";
  try {
    const response = await fetch("/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) showKeyField();
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        if (event.text) {
          answer += event.text;
          reply.textContent = answer;
          conversationEl.scrollTop = conversationEl.scrollHeight;
        }
      }
    }
    if (answer.trim()) {
      messages.push({ role: "assistant", content: answer });
    } else {
      messages.pop(); // an empty reply cannot be sent back as history: forget this turn
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.classList.add("error");
      reply.textContent = answer + "\n[" + e.message + "]";
      messages.pop(); // the turn failed: let the user try again
    }
  } finally {
    reply.classList.remove("streaming");
    sendButton.disabled = false;
    controller = null;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || sendButton.disabled) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

document.getElementById("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  conversationEl.textContent = "";
  input.focus();
});

window.addEventListener("hashchange", takeKeyFromFragment);
takeKeyFromFragment();
showModel();
