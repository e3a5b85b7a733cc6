"""A registered version served as a user serves it: `mlflow models serve` on a free loopback
port, a real test image posted as JSON, raw uint8 pixels in, the right class out; and the
model as `mlflow.pyfunc.load_model` gives it, predicting the same."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import requests
from conftest import VAL_SIZE

from pipeline import cli
from pipeline.data import load_dataset

pytestmark = pytest.mark.slow  # trains, then starts a model server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(model_uri: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the server's workers go with it
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.5)
    _stop(server)
    pytest.fail(f"mlflow models serve did not come up:\n{server.stdout.read()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_registered_version_serves_raw_test_images_and_pyfunc_predicts_the_same(
    tracking_store, image_folder
):
    options = ["--epochs=6", "--learning-rate=0.05", "--batch-size=32", f"--val-size={VAL_SIZE}"]
    cli.cli.main(["train", *options, f"--data={image_folder}"], standalone_mode=False)
    model_uri = "models:/cifar10-batch/1"
    dataset = load_dataset(image_folder)
    images = np.ascontiguousarray(dataset.test_images.transpose(0, 3, 1, 2))  # N x 3 x 32 x 32
    info = mlflow.models.get_model_info(model_uri)
    assert info.metadata["classes"] == list(dataset.classes)
    assert str(info.signature.inputs.inputs[0].type) == "uint8"

    loaded = mlflow.pyfunc.load_model(model_uri)
    logits = loaded.predict(images)
    assert logits.shape == (len(images), len(dataset.classes))
    right = np.flatnonzero(logits.argmax(axis=1) == dataset.test_labels)
    assert len(right) > len(images) / 2  # it learned the synthetic classes
    image = images[right[:1]]  # one test image the model gets right, raw uint8 pixels

    server = _serve(model_uri, port := _free_port())
    try:
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"inputs": image.tolist()},
            timeout=60,
        )
    finally:
        _stop(server)
    assert response.status_code == 200, response.text[-2000:]
    served = np.array(response.json()["predictions"], dtype=np.float32)
    assert served.shape == (1, len(dataset.classes))
    assert dataset.classes[served.argmax()] == dataset.classes[dataset.test_labels[right[0]]]
    np.testing.assert_allclose(served, loaded.predict(image), rtol=1e-5, atol=1e-5)
