"""The tasks a bundle can hold, and the model signature bundle.json declares for each.

A bundle names its task and its signature (the ONNX model's inputs and outputs, with
dtypes and shapes). Loading checks both: a service refuses a bundle of a task it does
not serve, or one whose model does not take and give what bundle.json says, naming
the file, before it answers anything with it.

Each task's serving half is declared here in one place: the preprocessing files the
bundle carries beside the model, and the signature its export must have. The pipeline's
half (reading raw examples, fitting that preprocessing, the models, the export) is in
`pipeline/tasks/<task>/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

TEXT_CLASSIFICATION = "text_classification"
IMAGE_CLASSIFICATION = "image_classification"
NEXT_WORD = "next_word"


@dataclass(frozen=True)
class TaskSpec:
    """What a bundle of this task carries and what its model takes and gives."""

    name: str
    # files beside the model that turn a request into the model's inputs
    preprocessing: tuple[str, ...]
    # input and output names, in the order the model declares them
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # bundle.json fields its preprocessing needs besides the shared ones
    meta: tuple[str, ...] = ()
    # what a /predict body names its items (`{"texts": [...]}`, `{"images": [...]}`)
    items: str = "texts"


TASKS = {
    TEXT_CLASSIFICATION: TaskSpec(
        name=TEXT_CLASSIFICATION,
        preprocessing=("tokenizer.json",),
        inputs=("input_ids", "attention_mask"),  # int64 [batch, tokens]
        outputs=("logits",),  # float32 [batch, classes]
        meta=("max_length", "pad_id"),
    ),
    IMAGE_CLASSIFICATION: TaskSpec(
        name=IMAGE_CLASSIFICATION,
        preprocessing=("image_spec.json",),
        inputs=("pixels",),  # float32 [batch, channels, height, width], normalised
        outputs=("logits",),  # float32 [batch, classes]
        items="images",
    ),
    NEXT_WORD: TaskSpec(
        name=NEXT_WORD,
        preprocessing=("tokenizer.json",),
        # int64 [batch, tokens]; int64 [batch, past + tokens] (0: left padding);
        # float32 [layers, 2, batch, heads, past, head_dim] (past may be 0 long)
        inputs=("input_ids", "attention_mask", "past_key_values"),
        # float32 [batch, tokens, vocabulary]; the cache with this call's entries added
        outputs=("logits", "present_key_values"),
        # max_len: the context in tokens (null: unbounded, a recurrent model); cache:
        # "all" entries (a Transformer's keys and values) or the "last" (an LSTM's state)
        # special: the ids of [PAD], [UNK] and [EOS] ({pad_id, unk_id, eos_id})
        meta=("max_len", "cache", "special"),
    ),
}
# bundle.json written before tasks existed names none: it is a text classifier
DEFAULT_TASK = TEXT_CLASSIFICATION


def task_of(meta: dict) -> TaskSpec:
    """The task a bundle's meta names; KeyError with the tasks served when unknown."""
    name = meta.get("task", DEFAULT_TASK)
    if name not in TASKS:
        raise KeyError(f"task {name!r} is not one this service serves "
                       f"({', '.join(sorted(TASKS))})")
    return TASKS[name]


def _tensors(args: list) -> dict[str, dict]:
    return {arg.name: {"dtype": arg.type.removeprefix("tensor(").removesuffix(")"),
                       "shape": list(arg.shape)} for arg in args}


def signature(session: ort.InferenceSession) -> dict:
    """{inputs, outputs}: each tensor's dtype and shape (named axes are dynamic), as
    onnxruntime reads them from the model."""
    return {"inputs": _tensors(session.get_inputs()),
            "outputs": _tensors(session.get_outputs())}


def signature_problems(spec: TaskSpec, declared: dict | None, actual: dict) -> list[str]:
    """Why a model's `actual` signature breaks its bundle's `declared` one or its task's
    names; empty when it does not. A bundle without a declared signature is checked
    against its task's names alone."""
    problems = []
    for side, names in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        if tuple(actual[side]) != names:
            problems.append(f"{side} {list(actual[side])}, where a {spec.name} model has "
                            f"{list(names)}")
        elif declared is not None and list(declared.get(side, {})) != list(actual[side]):
            problems.append(f"{side} {list(actual[side])}, bundle.json says "
                            f"{list(declared.get(side, {}))}")
        elif declared is not None:
            for name, tensor in actual[side].items():
                said = declared.get(side, {}).get(name)
                if said is not None and said["dtype"] != tensor["dtype"]:
                    problems.append(f"{side[:-1]} {name} is {tensor['dtype']}, bundle.json "
                                    f"says {said['dtype']}")
                elif said is not None and len(said["shape"]) != len(tensor["shape"]):
                    problems.append(f"{side[:-1]} {name} has {len(tensor['shape'])} axes, "
                                    f"bundle.json says {len(said['shape'])}")
    return problems
