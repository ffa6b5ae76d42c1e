// Suggestions while typing (/predict's top 5), the word actually typed next as
// feedback (the service's live top-1 accuracy rests on it), and a streamed
// continuation (/generate with server-sent events).

// A token as the word-level tokenizer cuts text (pipeline/tasks/next_word/tokenizer.py,
// WORD_PATTERN): a word (apostrophes inside), a run of hyphens, or one other
// non-space character. "mat," is the word "mat" and then ",".
const WORD_CHAR = "[\\p{L}\\p{M}\\p{N}_']";
const TOKEN = new RegExp(`${WORD_CHAR}+|-+|[^\\p{L}\\p{M}\\p{N}_'\\s]`, "u");
const ENDS_IN_WORD = new RegExp(`${WORD_CHAR}$`, "u");
const STARTS_WITH_WORD = new RegExp(`^${WORD_CHAR}`, "u");
// [EOS], [UNK], [PAD] may be among the top words: shown, but nothing to type
const SPECIAL = /^\[[A-Z]+\]$/;

// `text` with `word` appended as serving/bundle/words.py joins tokens: a space between,
// except before closing punctuation, after an opening bracket, around a hyphen, and
// where the text is empty or already ends in whitespace.
function joined(text, word) {
  if (!text || /\s$/.test(text) || /^[.,;:!?)\]}-]/.test(word) || /[([{-]$/.test(text)) {
    return text + word;
  }
  return `${text} ${word}`;
}

// The token typed after `asked` in `text`, once it is complete: something follows it, or
// `ended` (a chip put it there). null: none complete yet, keep waiting. undefined: `text`
// no longer continues `asked` (edited), or `asked` stopped mid-word and the typing
// carried on that word, so the prediction was for a token that never came.
function typedAfter(asked, text, ended) {
  if (!text.startsWith(asked)) return undefined;
  const rest = text.slice(asked.length);
  if (ENDS_IN_WORD.test(asked) && STARTS_WITH_WORD.test(rest)) return undefined;
  const start = rest.search(/\S/);
  if (start < 0) return null;
  const token = rest.slice(start).match(TOKEN)[0];
  return ended || rest.length > start + token.length ? token : null;
}

let newest = 0;  // the number of the newest /predict sent: older answers are not shown
let typing = null;  // the debounce timer
// Answered suggestion requests waiting for the word typed after their text, {id, text}.
// More than the newest one: a pause inside or right after a word answers a request
// for that text, and the request before it still deserves the word being finished.
let waiting = [];
const labelled = new Set();  // request ids given feedback: once each

function feedbackStatus(line) {
  $("feedback-status").textContent = line;
}

// Feedback never disturbs typing: its outcome (404 "disabled" without a prediction
// log, a label the service refuses, ...) only goes to the quiet status line.
async function sendFeedback(requestId, label) {
  if (labelled.has(requestId)) return;
  labelled.add(requestId);
  try {
    await call("/feedback", {request_id: requestId, position: 0, label});
    feedbackStatus(`feedback sent: '${label}' for request ${requestId}`);
  } catch (err) {
    feedbackStatus(`feedback not recorded ('${label}'): ${err.message}`);
  }
}

// Label each waiting request whose next word is now complete, and forget those the
// text has left behind.
function labelTyped(ended = false) {
  const text = $("nw-text").value;
  waiting = waiting.filter((request) => {
    const word = typedAfter(request.text, text, ended);
    if (word) sendFeedback(request.id, word);
    return word === null;
  });
}

function remember(request) {
  // "the cat" and "the cat " ask for the same position: the newer request stands for it
  const position = request.text.trimEnd();
  waiting = waiting.filter((other) => other.text.trimEnd() !== position);
  waiting.push(request);
  waiting = waiting.slice(-20);
}

function showSuggestions(words, requestId) {
  $("suggestions").dataset.requestId = requestId;
  $("suggestions").replaceChildren(...words.map(({word, probability}) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "suggestion";
    chip.dataset.word = word;
    chip.append(word, Object.assign(document.createElement("small"),
                                    {textContent: `${(probability * 100).toFixed(1)}%`}));
    chip.disabled = SPECIAL.test(word);
    chip.addEventListener("click", () => choose(word));
    return chip;
  }));
}

async function suggest() {
  clearTimeout(typing);
  const text = $("nw-text").value;
  const mine = ++newest;
  if (!text.trim()) {  // the service refuses an empty text; nothing to suggest yet
    $("suggestions").replaceChildren();
    return;
  }
  try {
    const answer = await call("/predict", {texts: [text], k: 5});
    if (mine !== newest) return;  // stale: a newer request is on its way
    $("error").textContent = "";
    remember({id: answer.request_id, text});
    showSuggestions(answer.predictions[0].next_words, answer.request_id);
  } catch (err) {
    if (mine !== newest) return;
    $("suggestions").replaceChildren();
    $("error").textContent = err.message;
  }
}

// A chip's word is typed for the user: it completes the next word at once.
function choose(word) {
  const box = $("nw-text");
  box.value = joined(box.value, word);
  labelTyped(true);
  box.focus();
  suggest();
}

$("nw-text").addEventListener("input", () => {
  labelTyped();  // at once: the next answer replaces what is waiting
  clearTimeout(typing);
  typing = setTimeout(suggest, 150);
});

// One server-sent event's name and data ("message" when it has no `event:` line).
function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return {name, data: data.length ? JSON.parse(data.join("\n")) : null};
}

// POST `body` to `path` for server-sent events: `onToken` sees each token event
// ({token, text so far}); the last event, the whole answer, is returned. Before the
// stream starts an error is an ordinary HTTP error (JSON), after it an `event: error`.
async function stream(path, body, onToken) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST", headers: headers({Accept: "text/event-stream"}),
      body: JSON.stringify(body)});
  } catch (err) {
    throw new Error(`could not reach the service (${err.message})`);
  }
  if (!response.ok) throw refusal(response, await answerOf(response));
  if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    return answerOf(response);  // answered whole after all (a proxy that buffers)
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // a blank line ends an event
        const {name, data} = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data === null) continue;
        if (name === "error") throw new Error(`${data.error} (${data.code})`);
        if ("finish_reason" in data) return data;
        onToken(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new Error("the stream ended before the answer was complete");
}

let continued = null;  // the finished /generate answer that Accept appends

$("continue").addEventListener("click", async () => {
  $("error").textContent = "";
  const button = $("continue");
  button.disabled = $("accept").disabled = true;
  continued = null;
  const shown = $("continuation");
  shown.textContent = "";
  // how many token events came, and the answer's request id: for people and tests
  shown.dataset.tokens = 0;
  delete shown.dataset.requestId;
  $("finished").hidden = true;
  try {
    const answer = await stream("/generate", {
      prompt: $("nw-text").value, max_new_tokens: Number($("max-new-tokens").value),
      temperature: Number($("temperature").value), stream: true},
      (update) => {
        shown.textContent = update.text;
        shown.dataset.tokens = Number(shown.dataset.tokens) + 1;
      });
    shown.textContent = answer.text;
    shown.dataset.requestId = answer.request_id;
    $("finish-reason").textContent = answer.finish_reason;
    $("finished").hidden = false;
    continued = answer;
    $("accept").disabled = false;
  } catch (err) {
    $("error").textContent = err.message;
  } finally {
    button.disabled = false;
  }
});

$("accept").addEventListener("click", () => {
  if (!continued) return;
  const box = $("nw-text");
  box.value = joined(box.value, continued.text.trim());
  // The service logs /generate with the continuation's first word: the user taking it
  // is that request's feedback. The suggestion requests waiting for this position
  // would count the same word again, and the model, not the user, chose it.
  const first = continued.text.trim().match(TOKEN);
  if (first) sendFeedback(continued.request_id, first[0]);
  waiting = [];
  continued = null;
  $("accept").disabled = true;
  $("continuation").textContent = "";
  $("finished").hidden = true;
  box.focus();
  suggest();
});

function setUpNextWord(generation) {
  $("max-new-tokens").value = generation.max_new_tokens ?? 32;
  $("temperature").value = generation.temperature ?? 0;
  // one status line, shown where the mode's feedback is given
  $("suggestions").after($("feedback-status"));
}
