// The image classifier's view: an upload or a drawing, its answer, the occlusion
// heat map over it, and feedback (page.js's helpers).

let spec = {height: 28, width: 28, resize: "crop", fill: 0};  // the bundle's `image`
let sent = null;  // the data URL the shown answer is for
let drawn = false;
const PREVIEW = 224;  // px, the longer side of the preview and of the drawing area
const FIT = {crop: "cover", stretch: "fill", pad: "contain"};

function sized(width, height) {
  // the model's aspect ratio, the longer side PREVIEW px
  const scale = PREVIEW / Math.max(width, height);
  return [Math.round(width * scale), Math.round(height * scale)];
}

function setUpImages(image) {
  spec = {...spec, ...image};
  const [width, height] = sized(spec.width, spec.height);
  const box = $("preview-box");
  box.style.width = `${width}px`;
  box.style.height = `${height}px`;
  // the preview shows the image as the model's resize rule frames it
  box.style.background = `rgb(${spec.fill},${spec.fill},${spec.fill})`;
  $("preview").style.objectFit = FIT[spec.resize] || "cover";
  const canvas = $("draw");
  canvas.width = width;
  canvas.height = height;
  clearDrawing();
}

function clearDrawing() {
  const canvas = $("draw");
  const pen = canvas.getContext("2d");
  // opaque black: the service would composite transparent pixels onto white
  pen.fillStyle = "#000";
  pen.fillRect(0, 0, canvas.width, canvas.height);
  drawn = false;
}

function useSource(name) {
  $(`source-${name}`).checked = true;
}

(function drawing() {
  const canvas = $("draw");
  let last = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width,
            (event.clientY - box.top) * canvas.height / box.height];
  };
  const stroke = (from, to) => {
    const pen = canvas.getContext("2d");
    pen.strokeStyle = "#fff";
    pen.lineWidth = Math.max(canvas.width, canvas.height) / 12;
    pen.lineCap = pen.lineJoin = "round";
    pen.beginPath();
    pen.moveTo(...from);
    pen.lineTo(...to);
    pen.stroke();
    drawn = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    stroke(last, last);
    useSource("drawing");
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const point = at(event);
    stroke(last, point);
    last = point;
  });
  for (const end of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(end, () => { last = null; });
  }
})();

$("clear").addEventListener("click", clearDrawing);
$("image-file").addEventListener("change", () => useSource("file"));

function dataUrlOf(file) {
  return new Promise((done, failed) => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.onerror = () => failed(new Error(`could not read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

async function imageToSend() {
  if ($("source-file").checked) {
    const file = $("image-file").files[0];
    if (!file) throw new Error("Choose an image file first, or draw one and send the drawing.");
    return dataUrlOf(file);
  }
  if (!drawn) throw new Error("Draw something first, or choose a file.");
  return $("draw").toDataURL("image/png");
}

function clearHeat() {
  const heat = $("heat");
  heat.hidden = true;
  heat.getContext("2d").clearRect(0, 0, heat.width, heat.height);
  delete heat.dataset.rows;
  delete heat.dataset.cols;
  $("heat-summary").textContent = "";
}

function heatColour(value, scale) {
  const alpha = (Math.min(Math.abs(value) / scale, 1) * 0.7).toFixed(3);
  return value >= 0 ? `rgba(220,30,30,${alpha})` : `rgba(30,90,230,${alpha})`;
}

// the saliency grid over the preview: cells are in the model's input pixels
function drawHeat(saliency) {
  const {rows, cols, cell_height: ch, cell_width: cw, values} = saliency;
  const heat = $("heat");
  const box = $("preview-box");
  heat.width = box.clientWidth;
  heat.height = box.clientHeight;
  const sx = heat.width / spec.width;
  const sy = heat.height / spec.height;
  const pen = heat.getContext("2d");
  pen.clearRect(0, 0, heat.width, heat.height);
  const scale = Math.max(1e-6, ...values.flat().map(Math.abs));
  let top = {value: -Infinity};
  values.forEach((row, r) => row.forEach((value, c) => {
    const x0 = Math.round(c * cw * sx), x1 = Math.round(Math.min((c + 1) * cw, spec.width) * sx);
    const y0 = Math.round(r * ch * sy), y1 = Math.round(Math.min((r + 1) * ch, spec.height) * sy);
    pen.fillStyle = heatColour(value, scale);
    pen.fillRect(x0, y0, x1 - x0, y1 - y0);
    if (value > top.value) top = {value, r, c};
  }));
  heat.dataset.rows = rows;
  heat.dataset.cols = cols;
  heat.setAttribute("aria-label", `heat map of ${rows} by ${cols} cells`);
  heat.hidden = false;
  $("heat-summary").textContent = top.value > 0
    ? `The cell that supports "${$("label").textContent}" most: row ${top.r + 1}, column ` +
      `${top.c + 1} of ${rows}×${cols} (hiding it lowers the probability by ${top.value.toFixed(3)}).`
    : `No cell of the ${rows}×${cols} grid supports the label on its own.`;
}

$("predict-image").addEventListener("click", async () => {
  $("error").textContent = "";
  const button = $("predict-image");
  button.disabled = true;
  try {
    const image = await imageToSend();
    const predicted = await call("/predict", {images: [image]});
    const answer = predicted.predictions[0];
    answered = predicted;
    sent = image;
    clearHeat();
    $("preview").src = image;
    showAnswer(answer);
    offerFeedback(Object.keys(answer.probabilities));
    $("result").hidden = false;
  } catch (err) {
    $("result").hidden = true;
    $("error").textContent = err.message;
  } finally {
    button.disabled = false;
  }
});

$("explain-image").addEventListener("click", async () => {
  $("error").textContent = "";
  const button = $("explain-image");
  button.disabled = true;
  try {
    const explained = await call("/explain", {image: sent});
    drawHeat(explained.saliency);
  } catch (err) {
    $("error").textContent = `Explain failed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
});
