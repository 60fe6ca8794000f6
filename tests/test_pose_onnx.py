"""BlazePose in ONNX (``mam.pose.blazepose``): conversion, graph parity with the TFLite
interpreter, pipeline parity with the mediapipe package, and the batched ``onnx`` video backend.

Frames: the bundled 720p demo recording (rendered infant) and matplotlib's Grace Hopper portrait
(a real photograph). The networks are converted once per session into a temporary cache. Bounds
were measured here (2026-11-26): graph outputs agree with TFLite to ~3e-5 of their range; the
ported pipeline is within ~1 px (mean) and ~0.2 mm (world) of MediaPipe's static-image mode. A
wrong anchor order, a missing crop rotation or no heatmap refinement moves the mean by 5 px to
hundreds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe")
pytest.importorskip("tflite")
pytest.importorskip("onnxruntime")

from mam.errors import CorruptVideoError  # noqa: E402
from mam.pose.base import create_backend  # noqa: E402
from mam.pose.blazepose import backend as onnx_backend  # noqa: E402,F401  (registers "onnx")
from mam.pose.blazepose import convert, detector  # noqa: E402
from mam.pose.blazepose.roi import crop, crop_matrix, roi_from_alignment_points  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"


@pytest.fixture(scope="session")
def pose_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("pose_cache")
    convert.ensure_all(cache)
    return cache


@pytest.fixture(scope="session")
def model(pose_cache):
    from mam.pose.blazepose.model import BlazePoseOnnx

    return BlazePoseOnnx(cache=pose_cache, threads=1)


@pytest.fixture(scope="session")
def demo_frames() -> list[np.ndarray]:
    from mam.video import iter_frames

    return [f for _, f in zip(range(60), iter_frames(DEMO))]


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    mpimg = pytest.importorskip("matplotlib.image")
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.ascontiguousarray(mpimg.imread(path)[..., :3])


@pytest.fixture(scope="session")
def mp_static():
    from mam.pose.mediapipe_backend import _import_mediapipe_pose

    mp_pose = _import_mediapipe_pose()
    pose = mp_pose.Pose(static_image_mode=True, model_complexity=1)
    yield pose
    pose.close()


# --- conversion ----------------------------------------------------------------------------------
def test_conversion_is_cached_by_weights_and_converter(pose_cache):
    first = convert.ensure_onnx(convert.LANDMARK, pose_cache)
    assert first.onnx_path.parent == pose_cache
    assert convert.cache_key(first.tflite_sha256) in first.onnx_path.name
    sidecar = first.onnx_path.with_suffix(".json").read_text()
    assert convert.CONVERTER_VERSION in sidecar and first.tflite_sha256 in sidecar
    stamp = first.onnx_path.stat().st_mtime_ns
    again = convert.ensure_onnx(convert.LANDMARK, pose_cache)
    assert again.onnx_path == first.onnx_path and again.onnx_path.stat().st_mtime_ns == stamp
    assert not list(pose_cache.glob("*.tmp"))  # atomic writes leave no temporary files
    # A new converter version or other weights mean another file, never a stale one.
    assert convert.cache_key("0" * 64) != convert.cache_key(first.tflite_sha256)


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(convert.ENV_CACHE, str(tmp_path))
    assert convert.cache_dir() == tmp_path
    with pytest.raises(ValueError, match="unknown BlazePose network"):
        convert.tflite_path("pose_landmark_heavy_typo")


def test_weights_are_found_without_importing_mediapipe(monkeypatch):
    # Located through the import system, not an import (which costs ~1.2 s of start-up on
    # every screening); the same typed error when the wheel is absent.
    path = convert.tflite_path(convert.LANDMARK)
    assert path.is_file() and path.suffix == ".tflite"
    real = convert.importlib.util.find_spec

    def without_mediapipe(name, *args):
        return None if name == "mediapipe" else real(name, *args)

    monkeypatch.setattr(convert.importlib.util, "find_spec", without_mediapipe)
    with pytest.raises(convert.DependencyMissingError, match="mediapipe 0.10.21"):
        convert.tflite_path(convert.LANDMARK)


@pytest.mark.parametrize("network", [convert.DETECTOR, convert.LANDMARK])
def test_converted_graph_matches_tflite_interpreter(pose_cache, network):
    pytest.importorskip("ai_edge_litert.interpreter")
    from export.blazepose import PARITY_RTOL, tflite_parity

    # A batch of 3 through ONNX Runtime (dynamic batch axis) against 3 single TFLite calls.
    parity = tflite_parity(convert.ensure_onnx(network, pose_cache))
    assert set(parity) == set(convert._OUTPUTS[network].values())
    assert max(parity.values()) < PARITY_RTOL, parity


def test_shifted_infant_is_followed_by_rerun_or_detection(pose_cache, demo_frames):
    # The infant jumps 200 px right after 8 frames: the tracked crop is wrong for frame 8, and
    # the backend must notice (drift or lost presence) and crop again rather than keep the track.
    frames = demo_frames[:16]
    moved = frames[:8] + [np.ascontiguousarray(np.roll(f, 200, axis=1)) for f in frames[8:]]
    backend = create_backend("onnx", cache=pose_cache, batch_size=8, detect_every=0)
    still = backend.estimate(frames)
    seq = backend.estimate(moved)
    stats = seq.meta["stats"]
    assert stats["reruns"] + stats["detections"] >= 2
    shift = seq.meta["image_joints"][8:] - still.meta["image_joints"][8:]
    np.testing.assert_allclose(np.median(shift[..., 0]), 200, atol=5)
    assert np.abs(shift - [200, 0]).mean() < 20  # kept on the stale crop: about 70 px


# --- pieces --------------------------------------------------------------------------------------
def test_anchor_layout():
    a = detector.ANCHORS
    assert a.shape == (2254, 2)
    np.testing.assert_allclose(a[:2], [[0.5 / 28, 0.5 / 28]] * 2)  # two anchors per cell
    np.testing.assert_allclose(a[2], [1.5 / 28, 0.5 / 28])  # then along x
    np.testing.assert_allclose(a[1568:1570], [[0.5 / 14, 0.5 / 14]] * 2)
    np.testing.assert_allclose(a[-6:], [[6.5 / 7, 6.5 / 7]] * 6)  # 3 stride-32 layers share a cell


def test_roi_rotation_and_crop_geometry():
    # Hips at the centre, the "scale point" straight to the image right: the body lies along +x,
    # so the crop turns by +90 degrees to make it point up.
    roi = roi_from_alignment_points(np.array([0.5, 0.5]), np.array([0.6, 0.5]), 1000, 500)[0]
    assert roi[4] == pytest.approx(np.pi / 2)
    assert roi[2] * 1000 == pytest.approx(2 * 100 * 1.25) == pytest.approx(roi[3] * 500)
    m = crop_matrix(roi, 1000, 500)
    centre = m @ np.array([128.0, 128.0, 1.0])
    np.testing.assert_allclose(centre, [500, 250])
    top = m @ np.array([128.0, 0.0, 1.0])  # the top of the crop lies toward the scale point
    assert top[0] > centre[0] + 100 and top[1] == pytest.approx(centre[1])
    frame = np.zeros((500, 1000, 3), np.uint8)
    frame[:, 600:] = 255  # right of the scale point: white
    out = crop(frame, roi)
    assert out[:20].mean() > 0.9 and out[-20:].mean() < 0.1


def test_one_euro_smooths_a_still_point_and_follows_a_moving_one():
    from mam.pose.blazepose.smoothing import one_euro, smooth_sequence

    rng = np.random.default_rng(0)
    still = 100 + rng.normal(0, 1.0, size=(200, 1))
    assert one_euro(still, np.full(200, 1 / 200))[50:].std() < 0.6 * still[50:].std()  # ~0.5
    ramp = np.linspace(0, 400, 200)[:, None]  # 2 px per frame: the filter opens up
    assert np.abs(one_euro(ramp, np.full(200, 1 / 200)) - ramp)[20:].max() < 5
    # Runs restart after an untracked frame: the value after the gap is taken as it is.
    image = np.full((5, 33, 4), 0.5)
    image[2] = np.nan
    image[3:, :, 0] = 0.9
    out, _ = smooth_sequence(image, image.copy(), (100, 100))
    assert np.isnan(out[2]).all() and np.allclose(out[3, :, 0], 0.9)


# --- pipeline parity with the mediapipe package --------------------------------------------------
def _parity(mp_static, model, frame):
    from mam.pose.mediapipe_backend import _landmarks_array

    ref = mp_static.process(frame)
    got = model.process_image(frame)
    assert ref.pose_landmarks is not None and got is not None
    h, w = frame.shape[:2]
    a = _landmarks_array(ref.pose_landmarks)
    b = _landmarks_array(ref.pose_world_landmarks)
    px = np.hypot((a[:, 0] - got.image[:, 0]) * w, (a[:, 1] - got.image[:, 1]) * h)
    world = np.linalg.norm(b[:, :3] - got.world[:, :3], axis=1)
    return px.mean(), world.mean(), np.abs(a[:, 3] - got.image[:, 3]).max()


def test_static_parity_on_demo_frames(mp_static, model, demo_frames):
    for frame in demo_frames[::20]:
        px, world, vis = _parity(mp_static, model, frame)
        assert px < 3.0 and world < 0.003 and vis < 0.02, (px, world, vis)


def test_static_parity_on_rotated_frame_and_photo(mp_static, model, demo_frames, photo):
    # A quarter turn puts the infant at another angle: crop rotation and its un-projection count.
    rotated = np.ascontiguousarray(np.rot90(demo_frames[10]))
    for frame in (rotated, photo):
        px, world, vis = _parity(mp_static, model, frame)
        assert px < 3.0 and world < 0.003 and vis < 0.02, (px, world, vis)


def test_nobody_in_a_blank_frame(model):
    assert model.process_image(np.full((360, 640, 3), 90, np.uint8)) is None


# --- the video backend ---------------------------------------------------------------------------
def test_onnx_backend_tracks_demo_like_mediapipe(pose_cache, demo_frames):
    from mam.pose.mediapipe_backend import MediaPipePoseBackend

    calls: list[int] = []
    backend = create_backend("onnx", cache=pose_cache, batch_size=4, detect_every=25)
    seq = backend.estimate(iter(demo_frames), progress=calls.append)
    with MediaPipePoseBackend() as mp:
        ref = mp.estimate(demo_frames)
    assert seq.source == backend.name and seq.joints.shape == (len(demo_frames), 17, 3)
    assert calls == list(range(1, len(demo_frames) + 1))
    assert set(ref.meta) <= set(seq.meta)
    assert seq.meta["image_size"] == ref.meta["image_size"] == (1280, 720)
    assert (seq.confidence > 0).any(1).all()
    np.testing.assert_array_equal(seq.joints[:, 0], 0.0)  # pelvis-relative
    stats = seq.meta["stats"]
    assert 1 <= stats["detections"] <= len(demo_frames) // 10  # sparse detection
    px = np.linalg.norm(seq.meta["image_joints"] - ref.meta["image_joints"], axis=-1)
    # MediaPipe smooths landmarks and keeps its own crop track: a few pixels apart, not tens.
    assert np.median(px) < 6.0 and px.mean() < 10.0, (np.median(px), px.mean())
    assert np.abs(seq.joints - ref.joints).mean() < 0.03


def test_onnx_backend_decode_errors_and_bad_input(pose_cache, demo_frames):
    backend = create_backend("onnx", cache=pose_cache, batch_size=2)

    def broken():
        yield from demo_frames[:3]
        raise CorruptVideoError("decoding failed part-way")

    with pytest.raises(CorruptVideoError):  # raised in the decode thread, re-raised here
        backend.estimate(broken())
    with pytest.raises(ValueError, match="RGB uint8"):
        backend.estimate([np.zeros((8, 8, 3), np.float32)])
    assert backend.estimate([]).num_frames == 0
    blank = [np.full((240, 320, 3), 90, np.uint8)] * 3
    seq = backend.estimate(blank)
    assert np.isnan(seq.joints).all() and (seq.confidence == 0).all()
    for bad in ({"batch_size": 0}, {"detect_every": -1}, {"roi_smoothing": 0.0}):
        with pytest.raises(ValueError):
            create_backend("onnx", cache=pose_cache, **bad)


def test_registering_the_backend_imports_nothing_heavy():
    import subprocess

    code = (
        "import sys, mam.pose.blazepose.backend; "
        "heavy = [m for m in ('cv2', 'onnxruntime', 'mediapipe', 'onnx', 'tflite') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.needs_tensorrt
def test_tensorrt_landmarks_match_onnxruntime(pose_cache, demo_frames, model):
    from mam.pose.blazepose.model import BlazePoseOnnx

    trt = BlazePoseOnnx(cache=pose_cache, runtime="tensorrt", max_batch=8, precision="fp32")
    frame = demo_frames[0]
    roi = model.roi_from_detection(model.detect(frame)[0], frame.shape[1], frame.shape[0])
    rois = np.repeat(roi[None], 8, axis=0)
    a = model.landmarks(demo_frames[:8], rois)
    b = trt.landmarks(demo_frames[:8], rois)
    assert np.abs(a.image[..., :2] - b.image[..., :2]).max() * 1280 < 1.0


def test_runtime_and_device_come_from_configuration(monkeypatch, pose_cache):
    """The service and CLI create backends by name only: MAM_POSE_RUNTIME / MAM_POSE_DEVICE
    choose where the networks run, and a wrong value is refused, not ignored."""
    from mam.pose import create_backend

    monkeypatch.setenv("MAM_POSE_RUNTIME", "tensorflow")
    with pytest.raises(ValueError, match="MAM_POSE_RUNTIME"):
        create_backend("onnx", cache=pose_cache)
    monkeypatch.setenv("MAM_POSE_RUNTIME", "onnxruntime")
    monkeypatch.setenv("MAM_POSE_DEVICE", "cpu")
    backend = create_backend("onnx", cache=pose_cache)
    assert backend.config["providers"] == ["CPUExecutionProvider"]


# --- PyTorch route (GPU machines without TensorRT) -----------------------------------------------
@pytest.mark.parametrize("network", [convert.DETECTOR, convert.LANDMARK])
def test_pytorch_graph_equals_onnx_runtime(pose_cache, network):
    """The PyTorch form of the converted networks (``torch_graph``) gives ONNX Runtime's outputs
    on a batch, so the GPU route screens as the CPU route does."""
    pytest.importorskip("torch")
    from mam.pose.blazepose.torch_graph import torch_network
    from mam.runtime.sessions import ort_session

    path = convert.ensure_onnx(network, pose_cache).onnx_path
    sess = ort_session(path)
    shape = sess.get_inputs()[0].shape
    lo = -1.0 if network == convert.DETECTOR else 0.0
    x = np.random.default_rng(3).uniform(lo, 1.0, (3, *shape[1:])).astype(np.float32)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    got = torch_network(path, max_batch=2)(x)  # two chunks, joined in order
    assert set(got) == set(ref)
    for k in ref:
        scale = max(float(np.abs(ref[k]).max()), 1.0)
        assert np.abs(got[k] - ref[k]).max() / scale < 1e-4, k


def test_pytorch_pose_runtime_tracks_like_onnx_runtime(pose_cache, demo_frames):
    pytest.importorskip("torch")
    from mam.pose.blazepose.backend import OnnxPoseBackend

    frames = demo_frames[:40]
    a = OnnxPoseBackend(runtime="onnxruntime", cache=pose_cache).estimate(iter(frames))
    b = OnnxPoseBackend(runtime="pytorch", cache=pose_cache).estimate(iter(frames))
    err = np.linalg.norm(a.meta["image_joints"] - b.meta["image_joints"], axis=-1)
    # Float rounding passes through the crop track (each frame's crop comes from the last
    # landmarks), so single joints drift apart by a few pixels at most; MediaPipe's own static
    # and tracking outputs differ by about 7 px.
    assert np.nanmedian(err) < 0.3 and np.nanpercentile(err, 99) < 6.0, np.nanpercentile(err, 99)


@pytest.mark.needs_cuda
def test_pytorch_pose_runtime_fp16_on_cuda(pose_cache, demo_frames):
    from mam.pose.blazepose.backend import OnnxPoseBackend

    frames = demo_frames[:40]
    a = OnnxPoseBackend(runtime="onnxruntime", cache=pose_cache).estimate(iter(frames))
    b = OnnxPoseBackend(runtime="pytorch", device="cuda", cache=pose_cache).estimate(iter(frames))
    err = np.linalg.norm(a.meta["image_joints"] - b.meta["image_joints"], axis=-1)
    assert np.nanmedian(err) < 2.0  # fp16
