// The demo page's requests, answers and feedback, and the text classifier's view.
// Loaded first: the other scripts use its helpers (classic scripts share one global
// scope, so each sees what the ones before it declared).

const $ = (id) => document.getElementById(id);

// The service's answer as JSON; an answer that is not JSON (a proxy's error page) is
// reported with its status rather than as a parse error.
async function answerOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    const said = text.trim().slice(0, 200);
    throw new Error(`the service answered ${response.status} ${response.statusText}` +
                    (said ? `: ${said}` : ""));
  }
}

// The error a refused request throws: the service's message ({"error": "...", "code"}),
// else the HTTP status.
function refusal(response, data) {
  const error = data.error ?? data.detail;
  return new Error(typeof error === "string" ? error
                   : `${response.status} ${response.statusText || "error"}`);
}

// The prediction routes' headers: JSON, and the API key typed in, if any (kept in this
// page's memory only).
function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return {"Content-Type": "application/json", ...(key ? {"X-API-Key": key} : {}), ...extra};
}

async function call(path, body, retries = 0) {
  let response;
  try {
    response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  } catch (err) {
    throw new Error(`could not reach the service (${err.message})`);
  }
  const data = await answerOf(response);
  // 503 with Retry-After: the prediction log has not written the answer yet
  const wait = Number(response.headers.get("Retry-After"));
  if (response.status === 503 && wait && retries < 3) {
    await new Promise((done) => setTimeout(done, wait * 1000));
    return call(path, body, retries + 1);
  }
  if (!response.ok) throw refusal(response, data);
  return data;
}

let answered = null;  // the /predict answer the feedback refers to

function offerFeedback(labels) {
  $("feedback-status").textContent = "";
  $("feedback-labels").replaceChildren(...labels.map((label) => {
    const button = document.createElement("button");
    button.textContent = label;
    button.dataset.label = label;
    button.addEventListener("click", async () => {
      try {
        await call("/feedback", {request_id: answered.request_id, position: 0, label});
        $("feedback-status").textContent = `Recorded: "${label}" for request ${answered.request_id}.`;
      } catch (err) {
        $("feedback-status").textContent = `Not recorded: ${err.message}`;
      }
    });
    return button;
  }));
}

function colour(attribution, scale) {
  const alpha = Math.min(Math.abs(attribution) / scale, 1) * 0.75;
  return attribution >= 0 ? `rgba(30,160,70,${alpha})` : `rgba(210,40,40,${alpha})`;
}

// label, score and a bar per class: {label, score, probabilities}
function showAnswer(answer) {
  $("label").textContent = answer.label;
  $("score").textContent = `(${(answer.score * 100).toFixed(1)}%)`;
  $("probs").replaceChildren(...Object.entries(answer.probabilities).map(([name, p]) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span class="name"></span><div class="track"><div class="fill"></div></div><span class="p"></span>`;
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = `${p * 100}%`;
    row.querySelector(".p").textContent = p.toFixed(3);
    return row;
  }));
}

function show(explained) {
  showAnswer(explained);
  const scale = Math.max(1e-6, ...explained.tokens.map((t) => Math.abs(t.attribution)));
  $("tokens").replaceChildren(...explained.tokens.map((t) => {
    const span = document.createElement("span");
    span.textContent = t.token;
    span.title = `attribution ${t.attribution.toFixed(4)}`;
    span.dataset.attribution = t.attribution;
    span.style.background = colour(t.attribution, scale);
    return span;
  }));
  $("result").hidden = false;
}

$("classify").addEventListener("click", async () => {
  $("error").textContent = "";
  try {
    const text = $("text").value;
    // /predict logs the answer under a request_id that feedback can name; /explain
    // gives the tokens' attributions for the same text
    const [predicted, explained] = await Promise.all([
      call("/predict", {texts: [text]}), call("/explain", {text})]);
    answered = predicted;
    show(explained);
    offerFeedback(Object.keys(explained.probabilities));
  } catch (err) {
    $("result").hidden = true;
    $("error").textContent = err.message;
  }
});
