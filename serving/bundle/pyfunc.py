"""The bundle as an MLflow pyfunc model (MLflow "models from code").

The deploy stage logs this file with the bundle as an artifact, so that
`mlflow models serve -m models:/<name>@champion --env-manager local` serves the
same bundle through MLflow's own scoring server: input a DataFrame with a `text`
column (an `image` column of encoded files, for an image bundle), output one row per
item with the label, its score and every class's probability; for a next-word bundle,
the `TOP_K` most probable next words and their probabilities (`word_1`, `p_1`, ...).
"""

from __future__ import annotations

import os

import mlflow
import pandas as pd

from serving.bundle import Bundle
from serving.bundle.predictions import predictions

TOP_K = 5  # next words per text, for a next-word bundle


def input_column(bundle: Bundle) -> str:
    """The DataFrame column a bundle's items come in: `text` or `image`."""
    return bundle.task.items.removesuffix("s")


class BundleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        precision = os.environ.get("TEXTOPS_PRECISION", "int8")
        self.bundle = Bundle.load(context.artifacts["bundle"], precision=precision)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        column = input_column(self.bundle)
        items = model_input[column].tolist()
        items = [bytes(i) for i in items] if column == "image" else [str(t) for t in items]
        if self.bundle.decoder is not None:
            return next_words(self.bundle.decoder.next_word_topk(items, TOP_K) if items else [])
        probs = self.bundle.predict_proba(items)
        names = self.bundle.label_names
        rows = []
        for answer in predictions(names, probs):
            per_class = {f"p_{name}": p for name, p in answer["probabilities"].items()}
            rows.append({"label": answer["label"], "score": answer["score"], **per_class})
        # columns named even for no rows, so the output schema never depends on the input
        return pd.DataFrame(rows, columns=["label", "score", *(f"p_{n}" for n in names)])


def next_words(answers: list[list[tuple[str, float]]]) -> pd.DataFrame:
    columns = [name for i in range(1, TOP_K + 1) for name in (f"word_{i}", f"p_{i}")]
    rows = [{key: value for i, (word, p) in enumerate(answer, 1)
             for key, value in ((f"word_{i}", word), (f"p_{i}", p))} for answer in answers]
    return pd.DataFrame(rows, columns=columns)


mlflow.models.set_model(BundleModel())
