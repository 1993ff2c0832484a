"""The classifier filter decodes a batch's images just before that batch runs, never a whole shard
first: at most one batch of decoded images is alive, and the probabilities are the pipeline's."""

from __future__ import annotations

import io
import weakref
from types import SimpleNamespace

from PIL import Image

from sdflow.config import ClassifierFilter
from sdflow.data.filters import classifier


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakePipeline:
    """An image-classification pipeline that scores an image by its red channel and records how
    many decoded images are alive when it runs."""

    def __init__(self, decoded: list[weakref.ref]):
        self.model = SimpleNamespace(config=SimpleNamespace(id2label={0: "red", 1: "other"}))
        self.decoded = decoded
        self.alive: list[int] = []

    def __call__(self, images, top_k=None, batch_size=1):
        self.alive.append(sum(ref() is not None for ref in self.decoded))
        return [
            [{"label": "red", "score": image.getpixel((0, 0))[0] / 255},
             {"label": "other", "score": 1 - image.getpixel((0, 0))[0] / 255}]
            for image in images
        ]  # fmt: skip


def test_images_are_decoded_one_batch_at_a_time(monkeypatch) -> None:
    decoded: list[weakref.ref] = []
    real = Image.Image.convert

    def convert(self, *args, **kwargs):
        image = real(self, *args, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(Image.Image, "convert", convert)
    pipe = FakePipeline(decoded)
    monkeypatch.setattr(classifier, "load_classifier", lambda source, device: pipe)
    rows = [{"image": png(shade)} for shade in range(0, 250, 25)]  # 10 rows
    spec = ClassifierFilter(model="some/model", label="red", max=0.5, batch_size=4)
    probabilities = classifier.label_probabilities(rows, spec)
    assert probabilities == [round(shade / 255, 6) for shade in range(0, 250, 25)]
    assert pipe.alive == [4, 4, 2]  # a shard-wide decode would show 10 alive at the first call
