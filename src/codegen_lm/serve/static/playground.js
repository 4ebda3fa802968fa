// The playground: streams /v1/completions or /v1/chat/completions (server-sent events) into highlighted code.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const PRELUDE = "# Import libraries.\n\nimport numpy as np\n\n";  // shown in "Program so far" only
  let model = null, controller = null;
  const turns = [];  // {spec, code, pre}

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem("codegen-lm-key") || "";
  keyInput.addEventListener("change", () => { sessionStorage.setItem("codegen-lm-key", keyInput.value); loadModel(); });

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
    return h;
  }

  function status(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
  }

  async function errorMessage(response) {
    try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
  }

  async function loadModel() {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model").textContent = "model list: " + await errorMessage(r); return; }
    model = (await r.json()).data[0].id;
    $("model").textContent = model;
  }

  function params() {
    const num = (id) => $(id).value === "" ? undefined : Number($(id).value);
    const stop = $("stop").value.split("\n").filter((s) => s !== "")
      .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
    const p = { model: model, max_tokens: num("max_tokens"), temperature: num("temperature"), top_p: num("top_p"),
                top_k: num("top_k"), seed: num("seed"), stream: true, stream_options: { include_usage: true } };
    if (stop.length) p.stop = stop;
    return p;
  }

  // POST body, read the SSE stream, call onText(delta) per piece; resolves to {usage, finish}.
  async function stream(path, body, onText) {
    controller = new AbortController();
    const started = performance.now();
    const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await errorMessage(r));
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", usage = null, finish = null, first = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            const text = c.text !== undefined ? c.text : (c.delta && c.delta.content) || "";
            if (text) { if (first === null) first = performance.now(); onText(text); }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    return { usage, finish, seconds: (performance.now() - started) / 1000,
             ttft: first === null ? null : (first - started) / 1000 };
  }

  function report(result) {
    const n = result.usage ? result.usage.completion_tokens : 0;
    const rate = result.seconds > 0 ? (n / result.seconds).toFixed(1) : "–";
    const ttft = result.ttft === null ? "" : ", first token after " + result.ttft.toFixed(2) + " s";
    status(n + " tokens in " + result.seconds.toFixed(2) + " s (" + rate + " tok/s" + ttft + "), finish: " + result.finish);
  }

  function busy(on, stopButton) {
    $("run").disabled = $("send").disabled = on;
    $(stopButton).disabled = !on;
  }

  // -- complete ---------------------------------------------------------------------------------------
  async function complete() {
    const prompt = $("prompt").value;
    let completion = "";
    const render = () => {
      $("output").innerHTML = '<span class="prompt">' + highlightPython(prompt) + "</span>" + highlightPython(completion);
    };
    render();
    status("generating…");
    busy(true, "stop-complete");
    try {
      report(await stream("/v1/completions", Object.assign(params(), { prompt: prompt }), (t) => { completion += t; render(); }));
    } catch (e) {
      status(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
    } finally {
      busy(false, "stop-complete");
    }
  }

  // -- multi-turn -------------------------------------------------------------------------------------
  function program() {
    return PRELUDE + turns.map((t) => "# " + t.spec.split("\n").join("\n# ") + "\n" + t.code.replace(/^\n+|\n+$/g, "") + "\n\n").join("");
  }

  function addTurn(spec) {
    const li = document.createElement("li");
    const p = document.createElement("div");
    p.className = "spec";
    p.textContent = spec;
    const pre = document.createElement("pre");
    pre.className = "code";
    li.append(p, pre);
    $("turns").append(li);
    const turn = { spec: spec, code: "", pre: pre };
    turns.push(turn);
    return turn;
  }

  async function send() {
    const spec = $("spec").value.trim();
    if (!spec) { status("write the next step first", true); return; }
    const messages = [];
    for (const t of turns) messages.push({ role: "user", content: t.spec }, { role: "assistant", content: t.code });
    messages.push({ role: "user", content: spec });
    const turn = addTurn(spec);
    $("spec").value = "";
    status("generating…");
    busy(true, "stop-chat");
    try {  // the server ends a turn where the next spec would begin; the stop sequences apply on top
      report(await stream("/v1/chat/completions", Object.assign(params(), { messages: messages }), (t) => {
        turn.code += t;
        turn.pre.innerHTML = highlightPython(turn.code);
      }));
    } catch (e) {
      status(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
    } finally {
      busy(false, "stop-chat");
      $("program").innerHTML = highlightPython(program());
    }
  }

  // -- wiring -----------------------------------------------------------------------------------------
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".tabs button")) {
        other.setAttribute("aria-selected", String(other === tab));
        $("mode-" + other.dataset.mode).hidden = other !== tab;
      }
    });
  }
  $("run").addEventListener("click", complete);
  $("send").addEventListener("click", send);
  $("spec").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  for (const id of ["stop-complete", "stop-chat"]) $(id).addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { turns.length = 0; $("turns").innerHTML = ""; $("program").innerHTML = ""; status(""); });
  $("output").innerHTML = highlightPython($("prompt").value);
  loadModel();
})();
