"""Label Studio's task format, both ways: the label queue out as tasks, with the
model's answer as a pre-annotation, and a project's JSON export back as /feedback
items, so that a team labels with the tool it already uses.

A task (labelstud.io/guide/tasks) is `{"data": {...}, "predictions": [...]}`; `data`
carries the text and the request id and position that name the answer in the
prediction log (and, while a challenger runs in shadow mode, its answer and whether
it disagreed). A classifier is labelled with a Choices control named `label`, a
next-word answer with a TextArea named `label` (the word typed next); `config` writes
the matching labelling configuration.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr


class ExportError(ValueError):
    """A Label Studio export that cannot be read as labels; names the task."""


def config(label_names: list[str] | None, images: bool = False) -> str:
    """The labelling configuration for these tasks: choices among the classifier's
    labels, or (None: a next-word model) a one-line text box for the next word; an
    image model's tasks show the logged thumbnail."""
    if label_names is None:
        control = ('  <TextArea name="label" toName="text" maxSubmissions="1" '
                   'placeholder="the word typed next"/>')
    else:
        choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in label_names)
        control = f'  <Choices name="label" toName="text" choice="single">\n{choices}\n  </Choices>'
    shown = ('  <Image name="text" value="$image"/>' if images else
             '  <Text name="text" value="$text"/>')
    return f'<View>\n{shown}\n{control}\n</View>\n'


class NotLabellable(ValueError):
    """Items a labeller cannot see (an image log that keeps hashes only)."""


def tasks(items: list[dict], classifier: bool, images: bool = False) -> list[dict]:
    """Label Studio tasks for label-queue items, the model's answer pre-filled. An
    image model's items are its logged thumbnails (PNG data URIs, under
    TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail)."""
    kind, field = ("choices", "choices") if classifier else ("textarea", "text")
    if images and any(not item["text"].startswith("data:image/") for item in items):
        raise NotLabellable("the prediction log keeps only each image's sha256; start the "
                            "service with TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail to label")
    shown = "image" if images else "text"
    return [{"data": {shown: item["text"], "request_id": item["request_id"],
                      "position": item["position"], **challenged(item)},
             "predictions": [{"model_version": item["model_version"],
                              "score": item["probabilities"][0],
                              "result": [{"from_name": "label", "to_name": "text",
                                          "type": kind,
                                          "value": {field: [item["predicted"]]}}]}]}
            for item in items]


def challenged(item: dict) -> dict:
    """A task's data fields for the shadow challenger's answer, where it gave one:
    Label Studio's data manager shows them as columns, to filter the disagreements
    by (they come first in the queue)."""
    other = item.get("challenger")  # None: no challenger, or an older service's queue
    if not other:
        return {}
    return {"disagreed": bool(item.get("disagreed")), "challenger_label": other["label"],
            "challenger_version": other["model_version"]}


def feedback_items(export: list) -> list[dict]:
    """/feedback items from a Label Studio JSON export: each task's latest annotation
    that was not skipped; tasks nobody labelled are left out."""
    if not isinstance(export, list):
        raise ExportError("a Label Studio JSON export is a list of tasks")
    items = []
    for number, task in enumerate(export):
        where = f"task {number}"
        try:
            data = task["data"]
            request_id, position = data["request_id"], int(data["position"])
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{where}: no data.request_id and data.position (tasks "
                              "made by `textops label-queue` carry them)") from None
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue
        latest = max(done, key=lambda a: a.get("updated_at") or a.get("created_at") or "")
        values = [r.get("value", {}) for r in latest.get("result") or []
                  if r.get("from_name") == "label"]
        label = next((v.get("choices", v.get("text")) for v in values), None)
        if not label or not isinstance(label, list) or not str(label[0]).strip():
            raise ExportError(f"{where} (request {request_id!r}): its annotation has no "
                              "`label` choice or text")
        items.append({"request_id": request_id, "position": position,
                      "label": str(label[0]).strip()})
    return items
