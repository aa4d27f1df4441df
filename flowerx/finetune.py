"""`--fine-tune-blocks N`: after the head has converged, train the network's top N blocks with it.

The network below those blocks stays frozen, so its output (the "trunk" activations) is computed once per
image on onnxruntime and cached like the bottlenecks (float16); the top blocks and the head then train on
the cache in seconds per epoch, with a low learning rate and early stopping on validation accuracy.
BatchNorm layers keep their ImageNet statistics (inference mode), as is usual for small datasets. The top
blocks are the base model's own layers, so training them updates the network that is exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Console

from .architectures import Architecture
from .errors import FlowerxError


def cut_layer(arch: Architecture, blocks: int) -> str:
    """The name of the last frozen layer when the top `blocks` blocks are trained."""
    if arch.family == "inception_v3":
        if not 1 <= blocks <= 10:
            raise FlowerxError("--fine-tune-blocks for inception_v3 must be 1-10 (its mixed blocks)")
        return f"mixed{10 - blocks}"
    if not 1 <= blocks <= 12:
        raise FlowerxError("--fine-tune-blocks for MobileNet v1 must be 1-12 (its depthwise blocks)")
    return f"conv_pw_{13 - blocks}_relu"


@dataclass
class FineTuneResult:
    kernel: np.ndarray
    bias: np.ndarray
    validation_accuracy: float
    epochs: int
    test_predictions: np.ndarray  # argmax per test index, in the order given


def trunk_model(base, arch: Architecture, blocks: int):
    """uint8 image -> normalise -> the frozen part of base (a Keras model sharing base's layers)."""
    from .backbone import keras

    cut = base.get_layer(cut_layer(arch, blocks)).output
    size = arch.input_size
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / arch.std, offset=-arch.mean / arch.std)(keras.ops.cast(image, "float32"))
    return keras.Model(image, keras.Model(base.input, cut)(x)), tuple(int(d) for d in cut.shape[1:])


def fine_tune(
    base, arch: Architecture, blocks: int, activations: np.ndarray, y: np.ndarray, splits: dict[str, np.ndarray],
    kernel: np.ndarray, bias: np.ndarray, learning_rate: float, max_epochs: int, batch_size: int, seed: int,
    console: Console,
) -> FineTuneResult:
    """Train the top `blocks` blocks of base and the head on cached trunk activations."""
    from .backbone import keras, tf

    keras.utils.set_random_seed(seed)
    top = keras.Model(base.get_layer(cut_layer(arch, blocks)).output, base.output)
    for layer in top.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    head = keras.layers.Dense(kernel.shape[1], activation="softmax", name="head")
    model = keras.Sequential([top, head])
    model.build((None, *activations.shape[1:]))
    head.set_weights([kernel, bias])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    def data(idx: np.ndarray, shuffle: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(idx)
        if shuffle:
            ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).map(
            lambda i: tf.numpy_function(lambda j: (activations[j].astype(np.float32), y[j]), [i], (tf.float32, tf.int64)),
        ).map(lambda a, b: (tf.ensure_shape(a, (None, *activations.shape[1:])), tf.ensure_shape(b, (None,))))

    class Log(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            console.print(f"Fine-tune epoch {epoch + 1:>2}: train accuracy {logs.get('accuracy', 0) * 100:5.1f}%  "
                          f"loss {logs.get('loss', 0):.4f}  validation accuracy {logs.get('val_accuracy', 0) * 100:5.1f}%",
                          highlight=False)

    start_weights = model.get_weights()
    _, start_accuracy = model.evaluate(data(splits["validation"], False), verbose=0)
    console.print(f"Fine-tune: validation accuracy before {start_accuracy * 100:5.1f}%", highlight=False)
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=3, restore_best_weights=True,
                                         start_from_epoch=0)
    history = model.fit(data(splits["train"], True), validation_data=data(splits["validation"], False),
                        epochs=max_epochs, callbacks=[stop, Log()], verbose=0, shuffle=False)  # ds shuffles
    best = int(np.argmax(history.history["val_accuracy"]))
    best_accuracy, epochs = float(history.history["val_accuracy"][best]), best + 1
    if best_accuracy <= start_accuracy:  # fine-tuning never beat the head alone: keep the head alone
        model.set_weights(start_weights)
        best_accuracy, epochs = float(start_accuracy), 0
    test = splits["test"]
    predictions = model.predict(data(test, False), verbose=0).argmax(1) if len(test) else np.zeros(0, int)
    new_kernel, new_bias = head.get_weights()
    return FineTuneResult(new_kernel, new_bias, best_accuracy, epochs, predictions)
