// The parts of flowerx's two pages (the export web page and flowerx serve's) that show things: a status
// line, the top predictions as bars, and a photo taken from a drop, a paste or the file input.
"use strict";
window.flowerxPage = (() => {
  const $ = (id) => document.getElementById(id);

  function setStatus(text, error = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", error);
  }

  // predictions: [{label, score}], best first; every label is shown as text, never as markup.
  function showPredictions(predictions, status) {
    const list = $("results");
    list.replaceChildren();
    for (const { label, score } of predictions) {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      name.title = label;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(score * 100).toFixed(1)}%`;
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = `${(score * 100).toFixed(1)}%`;
      item.append(name, bar, value);
      list.append(item);
    }
    setStatus(status);
  }

  // Calls classify(file) -> {predictions, status} for each photo dropped, pasted or chosen.
  function onPhoto(classify) {
    async function handle(file) {
      if (!file) return;
      const preview = $("preview");
      if (preview.src) URL.revokeObjectURL(preview.src);
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      setStatus("Classifying…");
      try {
        const { predictions, status } = await classify(file);
        showPredictions(predictions, status);
      } catch (e) {
        $("results").replaceChildren();
        setStatus(`Cannot classify this file: ${e.message || e}`, true);
      }
    }
    const drop = $("drop");
    $("file").addEventListener("change", (e) => handle(e.target.files[0]));
    drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && $("file").click());
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      handle(e.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
      if (item) handle(item.getAsFile());
    });
  }

  return { $, setStatus, showPredictions, onPhoto };
})();
