// GET /label-queue with the admin token typed above: read from the field at each load,
// never put in storage or a URL, since it opens every user's texts. Each answer gets a
// button per label (a next-word answer: a box for the word typed next); a label sent
// to POST /feedback takes the answer off the list, as the service's queue does.

let model = null;  // /metadata, once the model is ready

function queueStatus(line) {
  $("queue-status").textContent = line;
}

// What the answer was given: the logged text, or an image model's thumbnail (a log
// that keeps only each image's sha256 has nothing to show).
function queuedInput(item) {
  if (model.task === "image_classification") {
    if (item.text.startsWith("data:image/")) {
      return Object.assign(document.createElement("img"),
                           {src: item.text, alt: `the image of request ${item.request_id}`});
    }
    return Object.assign(document.createElement("div"), {className: "queue-text",
      textContent: `an image (${item.text.slice(0, 20)}…): the log keeps no thumbnail ` +
                   "(TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail keeps one)"});
  }
  return Object.assign(document.createElement("div"),
                       {className: "queue-text", textContent: item.text});
}

async function labelQueued(item, entry, label, controls) {
  controls.forEach((control) => { control.disabled = true; });
  try {
    await call("/feedback", {request_id: item.request_id, position: item.position, label});
    entry.remove();
    queueStatus(`Recorded: "${label}" for request ${item.request_id} position ` +
                `${item.position}; ${$("queue-items").children.length} left.`);
  } catch (err) {
    controls.forEach((control) => { control.disabled = false; });
    queueStatus(`Not recorded ("${label}" for request ${item.request_id}): ${err.message}`);
  }
}

function labelControls(item, entry) {
  const box = document.createElement("div");
  if (model.label_names && model.task !== "next_word") {
    const buttons = model.label_names.map((label) => Object.assign(
      document.createElement("button"), {type: "button", textContent: label}));
    buttons.forEach((button) => {
      button.dataset.label = button.textContent;
      button.addEventListener("click", () => labelQueued(item, entry, button.textContent, buttons));
    });
    box.append(...buttons);
    return box;
  }
  const word = Object.assign(document.createElement("input"), {
    type: "text", placeholder: "the word typed next", className: "queue-word"});
  const send = Object.assign(document.createElement("button"), {type: "button",
                                                                textContent: "Send"});
  send.addEventListener("click", () => {
    if (word.value.trim()) labelQueued(item, entry, word.value.trim(), [word, send]);
  });
  box.append(word, send);
  return box;
}

function queueEntry(item) {
  const entry = document.createElement("li");
  entry.className = item.disagreed ? "queue-item disagreed" : "queue-item";
  entry.dataset.requestId = item.request_id;
  entry.dataset.position = item.position;
  const why = Object.assign(document.createElement("div"), {className: "why",
    textContent: `${item.model_version} said "${item.predicted}" · margin ` +
                 `${item.margin.toFixed(3)} · entropy ${item.entropy.toFixed(3)}`});
  if (item.disagreed) {  // why it leads the queue: a label settles which model was right
    why.append(Object.assign(document.createElement("span"), {className: "disagreement",
      textContent: ` · the challenger ${item.challenger.model_version} said ` +
                   `"${item.challenger.label}"`}));
  }
  entry.append(queuedInput(item), why, labelControls(item, entry));
  return entry;
}

async function loadQueue() {
  const token = $("admin-token").value.trim();
  if (!token) return queueStatus("Type the service's admin token (TEXTOPS_ADMIN_TOKEN) first.");
  if (!model) return queueStatus("The model is not ready yet: its labels are not known.");
  const query = new URLSearchParams({budget: $("queue-budget").value,
                                     strategy: $("queue-strategy").value});
  const button = $("load-queue");
  button.disabled = true;
  queueStatus("loading…");
  try {
    let response;
    try {
      response = await fetch(`/label-queue?${query}`,
                             {headers: {Authorization: `Bearer ${token}`}});
    } catch (err) {
      throw new Error(`could not reach the service (${err.message})`);
    }
    const data = await answerOf(response);
    if (!response.ok) {
      throw new Error(`${response.status}: ${refusal(response, data).message}`);
    }
    $("queue-items").replaceChildren(...data.items.map(queueEntry));
    const first = data.items.filter((item) => item.disagreed).length;
    queueStatus(data.items.length === 0 ? "Nothing to label: no unlabelled answer in the log."
      : `${data.items.length} answer(s), by ${data.strategy}` + (first
        ? `; ${first} first: the challenger ${data.challenger} labelled ` +
          `${first === 1 ? "it" : "them"} otherwise.` : "."));
  } catch (err) {
    $("queue-items").replaceChildren();
    queueStatus(`Queue not loaded: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

$("load-queue").addEventListener("click", loadQueue);
$("admin-token").addEventListener("keydown", (event) => {
  if (event.key === "Enter") loadQueue();
});
