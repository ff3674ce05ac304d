"""How well a grounder that reads only some of the words could do on the synthetic referring benchmark.

``python -m training.refer_ceiling --root DATA/refer --blind shape`` reads each test expression the way a perfect
grounder blind to ``--blind`` attributes would: it keeps the image's objects whose colour / size / shape match the
words it can read (``instances.json`` ``attributes``, written by ``training.synthetic``), takes the extreme one of
those for a location word (left / right / top / bottom by box centre, the middle one by x), and guesses among what
is left. The figure is its expected Acc@0.5 (1 / candidates when the referent is among them), overall and per
``training.evaluate.expression_cue``. With nothing blind it is about 100; with ``--blind shape`` it shows how much
of the benchmark needs the shape words at all.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.evaluate import CUE_WORDS, _objects_of_image, _refer_sentences, metrics_by_cue
from training.synthetic import LOCATION_PHRASES, SHAPE_COLOURS, SHAPES, SIZE_WORDS, expression_words

ATTRIBUTE_WORDS: dict[str, dict[str, frozenset[str]]] = {  # attribute -> value -> the words that name it
    "colour": {colour: frozenset([colour]) for colour in SHAPE_COLOURS},
    "size": {size: frozenset(words) for size, words in SIZE_WORDS.items()},
    "shape": {shape: frozenset([shape]) for shape in SHAPES},
}
# location word -> location, over the words ``training.evaluate.expression_cue`` counts as location words
LOCATION_WORDS: dict[str, str] = {
    word: location for location, phrases in LOCATION_PHRASES.items() for phrase in phrases for word in phrase.split()
    if word in dict(CUE_WORDS)["location"]
}


def _centre(ann: dict) -> tuple[float, float]:
    x, y, w, h = ann["bbox"]
    return x + w / 2, y + h / 2


def read_expression(text: str, objects: list[dict], blind: Sequence[str] = ()) -> list[dict]:
    """The objects a reader blind to ``blind`` attributes cannot tell apart as the referent of ``text``."""
    words = expression_words(text)
    candidates = list(objects)
    for attribute, values in ATTRIBUTE_WORDS.items():
        if attribute in blind:
            continue
        named = [value for value, value_words in values.items() if words & value_words]
        if named:
            candidates = [o for o in candidates if o["attributes"][attribute] in named]
    location = next((LOCATION_WORDS[w] for w in sorted(words) if w in LOCATION_WORDS), None)
    if not candidates or location is None:
        return candidates or list(objects)
    if location == "middle":
        return [sorted(candidates, key=lambda o: _centre(o)[0])[len(candidates) // 2]]
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[location]
    return [min(candidates, key=lambda o: sign * _centre(o)[axis])]


def ceiling(data_root: Path, blind: Sequence[str] = (), split: str = "test", dataset: str = "refsynth",
            split_by: str = "unc") -> dict[str, float]:
    """Expected Acc@0.5 (percent) of the blind reader over every sentence of ``split``, overall and per cue."""
    from training.datasets import read_refer

    refer = read_refer(data_root, dataset, split_by)
    objects = _objects_of_image(refer)
    texts, scores = [], []
    for image_id, items in _refer_sentences(refer, split).items():
        for ref, text in items:
            left = read_expression(text, objects[image_id], blind)
            texts.append(text)
            scores.append(1.0 / len(left) if any(o["id"] == ref["ann_id"] for o in left) else 0.0)
    result = {"ceiling": 100.0 * float(np.mean(scores)), "sentences": float(len(scores))}
    return {**result, **metrics_by_cue(texts, {"ceiling": scores})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.refer_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="synthetic refer data root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--blind", nargs="*", default=[], choices=sorted(ATTRIBUTE_WORDS),
                        help="attributes whose words the reader ignores")
    args = parser.parse_args(argv)
    print(json.dumps({k: round(v, 2) for k, v in ceiling(args.root, args.blind, args.split).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
