import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tlcm.errors import TLCMError
from tlcm.evaluate.metrics import (
    AestheticScore,
    ClipScore,
    InceptionFID,
    MetricSpec,
    MetricUnavailable,
    Reference,
    ToyWorldMetrics,
    aesthetic_mlp,
    build_metrics,
    to_tensor,
)


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_fid_identical_sets_near_zero_and_different_sets_positive(fake_inception):
    fid = InceptionFID(fake_inception)
    a, b = _images(40, 0), _images(40, 1)
    dark = [Image.fromarray((np.asarray(im) // 3).astype(np.uint8)) for im in b]
    notes = fid.prepare(Reference(prompts=[""] * 40, data_images=a, teacher_images=None))
    assert notes == ["fid_teacher skipped: no teacher reference images"]
    same = fid.compute(a, [""] * 40)["fid_data"]
    other = fid.compute(b, [""] * 40)["fid_data"]
    shifted = fid.compute(dark, [""] * 40)["fid_data"]
    assert abs(same) < 1e-6
    assert other > 1e-4
    assert shifted > 10 * other  # a global darkening moves the pooled-colour mean far


def test_fid_weights_path_errors_and_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCM_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable, match="no Inception weights"):
        InceptionFID(None)
    with pytest.raises(TLCMError, match="not found"):
        InceptionFID(tmp_path / "missing.pt")
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"not torchscript")
    with pytest.raises(TLCMError, match="not a TorchScript"):
        InceptionFID(tmp_path)
    with pytest.raises(TLCMError, match="not a TorchScript"):  # a broken cached file is an error, not a skip
        build_metrics(MetricSpec(fid=True))


def test_missing_weights_give_notices_not_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCM_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    metrics, notices = build_metrics(MetricSpec(fid=True, clip_model=str(tmp_path / "no-clip"),
                                                aesthetic_weights=str(tmp_path / "no.pth")))
    assert metrics == []
    text = "\n".join(notices)
    assert "FID skipped: no Inception weights" in text
    assert "CLIP score skipped" in text
    assert "aesthetic score skipped" in text
    metrics, notices = build_metrics(MetricSpec(fid=False))
    assert any("no CLIP model given" in n for n in notices) and any("no predictor weights" in n for n in notices)


class _FakeToy:
    """A toy-metrics stand-in whose 'classifier' reads the mean colour; alignment = fraction of red prompts that are
    red images."""

    def features(self, x):
        return x.mean(dim=(2, 3))

    def alignment(self, x, prompts):
        red = (x[:, 0].mean(dim=(1, 2)) > 0.5).float()
        want = torch.tensor([1.0 if "red" in p else 0.0 for p in prompts])
        return float((red == want).float().mean())


def test_toy_metrics_plugin_with_injected_models():
    a = torch.rand(30, 3, 8, 8) * 0.4
    a[:15, 0] += 0.6
    prompts = ["red"] * 15 + ["blue"] * 15
    m = ToyWorldMetrics(_FakeToy())
    m.prepare(Reference(prompts=prompts, data_images=a, teacher_images=a.flip(0)))
    out = m.compute(a, prompts)
    assert out["alignment"] == 1.0
    assert abs(out["toy_fid_data"]) < 1e-6 and abs(out["toy_fid_teacher"]) < 1e-6  # the same set, reordered
    assert m.compute(a.flip(0), prompts)["alignment"] == 0.0


def test_real_toy_metrics_alignment_of_real_images_near_classifier_accuracy():
    toy = pytest.importorskip("tlcm.toy.metrics")
    from tlcm.toy import assets_dir
    from tlcm.toy.shapes import prompts as toy_prompts
    from tlcm.toy.shapes import render_prompts

    assert (assets_dir("v3") / "metrics" / "classifier.safetensors").is_file(), "the v3 classifier ships"
    classifier = toy.ToyMetrics.load(world="v3")
    accuracy = toy.evaluate_classifier(classifier, n=200, seed=77)["accuracy_train_mean"]
    prompts = toy_prompts(200, seed=123)
    images = render_prompts(prompts, seed=5)
    m = ToyWorldMetrics(classifier)
    m.prepare(Reference(prompts=prompts, data_images=images, teacher_images=render_prompts(prompts, seed=6)))
    out = m.compute(images, prompts)
    assert abs(out["alignment"] - accuracy) < 0.08
    assert abs(out["toy_fid_data"]) < 1e-6  # identical sets
    assert out["toy_fid_teacher"] < m.compute([ImageOps.invert(im) for im in images], prompts)["toy_fid_data"]


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tlcm.testing import tiny_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=514, bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    path = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=tiny_clip_tokenizer())
    proc.save_pretrained(path)
    return path


def test_clip_score_and_aesthetic_with_local_weights(tmp_path):
    clip_dir = _tiny_clip(tmp_path)
    images = _images(4, 3)
    prompts = ["a red circle", "a blue box", "x", "y"]
    score = ClipScore(str(clip_dir))
    val = score.compute(images, prompts)["clip_score"]
    img = torch.nn.functional.normalize(score.image_embeds(images), dim=-1)
    txt = torch.nn.functional.normalize(score.text_embeds(prompts), dim=-1)
    assert val == pytest.approx(float((100 * (img * txt).sum(-1)).clamp(min=0).mean()), abs=1e-4)
    assert 0.0 <= val <= 100.0

    torch.manual_seed(1)
    head = aesthetic_mlp(16)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")
    aes = AestheticScore(tmp_path / "aesthetic.pth", str(clip_dir))
    expected = float(head.eval()(img).mean().detach())
    assert aes.compute(images, prompts)["aesthetic"] == pytest.approx(expected, abs=1e-5)

    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(TLCMError, match="not a LAION aesthetic predictor"):
        AestheticScore(tmp_path / "bad.pth", str(clip_dir))
    metrics, notices = build_metrics(MetricSpec(fid=False, clip_model=str(clip_dir),
                                                aesthetic_weights=str(tmp_path / "aesthetic.pth")))
    assert [type(m).__name__ for m in metrics] == ["ClipScore", "AestheticScore"] and notices == []


def test_to_tensor_from_pil_and_tensor():
    ims = _images(2, 0)
    t = to_tensor(ims)
    assert t.shape == (2, 3, 16, 16) and 0 <= float(t.min()) and float(t.max()) <= 1
    assert torch.equal(to_tensor(t), t)
