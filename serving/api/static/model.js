// What the service serves (/metadata), which chooses the view; runs last, once every
// view's script is loaded.

function describe(m) {
  if (m.task === "next_word") {
    const perplexity = m.metrics && typeof m.metrics.perplexity === "number"
      ? ` · test perplexity ${m.metrics.perplexity.toFixed(1)}` : "";
    return `${m.model_name} ${m.version} · next-word model${perplexity}`;
  }
  const accuracy = m.metrics && typeof m.metrics.accuracy === "number"
    ? ` · test accuracy ${m.metrics.accuracy.toFixed(3)}` : "";
  return `${m.model_name} ${m.version} · classes: ${m.label_names.join(", ")}${accuracy}`;
}

async function loadModel() {
  let m;
  try {
    m = await (await fetch("/metadata")).json();
  } catch {
    m = {};
  }
  if (!m.version) {
    $("meta").textContent = "the model is not ready yet";
    setTimeout(loadModel, 2000);
    return;
  }
  model = m;
  const images = m.task === "image_classification";
  const nextWord = m.task === "next_word";
  if (images) setUpImages(m.image || {});
  if (nextWord) setUpNextWord(m.generation || {});
  $("text-input").hidden = images || nextWord;
  $("image-input").hidden = !images;
  $("next-word").hidden = !nextWord;
  // no label to show or explain: a next-word model has no /explain
  if (nextWord) $("result").hidden = true;
  $("text-explain").hidden = images;
  $("image-explain").hidden = !images;
  $("meta").textContent = describe(m);
}

loadModel();
