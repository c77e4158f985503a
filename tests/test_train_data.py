"""Training on a real backbone: a prompt file as the generator's stream, a captioned image folder as
DMD2's GAN data, real teachers refusing to train on the toy world's prompts, DMD pairs drawn from
the training prompts. The teacher is a tiny random SDXL linked like stable-diffusion-xl-base-1.0."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.backbones.sdxl import SDXLBackbone
from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.train_data import ImageFolder, PromptStream, centre_crop_resize

torch.set_num_threads(1)
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]


@pytest.fixture
def linked(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    SDXLBackbone.tiny(resolution=16, seed=3).save_pretrained(root / "my-sdxl")
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    out = tmp_path / "teacher"
    main(["teacher", "link", "--family", "sdxl", "--weights", "my-sdxl", "--dtype", "fp32",
          "--resolution", "16", "--out", str(out)])
    return out


def write_prompts(path, captions=CAPTIONS):
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": c}) + "\n"
                            for i, c in enumerate(captions)))
    return path


def write_images(folder, n=4, size=(32, 96)):
    """Wide images, black at the sides and white in the middle: a centre crop is all white."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = np.zeros((size[0], size[1], 3), np.uint8)
        pixels[:, size[1] // 4: size[1] - size[1] // 4] = 255
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_prompt_stream_draws_file_rows_encoded_and_repeatable(tmp_path):
    teacher = SDXLBackbone.tiny(resolution=16, seed=3)
    stream = PromptStream(write_prompts(tmp_path / "train.jsonl"), teacher)
    a = stream.draw(3, torch.Generator().manual_seed(7), repeat=2)
    b = stream.draw(3, torch.Generator().manual_seed(7), repeat=2)
    assert [m["prompt"] for m in a.metas] == [m["prompt"] for m in b.metas]
    assert len(a) == 6 and a.metas[0] == a.metas[1] and a.groups.tolist() == [0, 0, 1, 1, 2, 2]
    expected = teacher.encode([m["prompt"] for m in a.metas])
    for key in expected:
        assert torch.allclose(a.cond[key], expected[key], atol=1e-6), key
    assert set(m["prompt"] for m in a.metas) <= set(CAPTIONS)


def test_image_folder_centre_crops_to_the_teacher_size_with_own_captions(tmp_path):
    data = ImageFolder(write_images(tmp_path / "real"), (16, 16))
    images, rows = data.draw(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    # 32x96 -> 16x48 (covers 16x16), the crop takes columns 16-32, inside the white 12-36
    assert images.min() >= 0.99
    assert all(r["prompt"] in CAPTIONS for r in rows)  # `text` is read as the caption
    wide = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    assert centre_crop_resize(wide, (20, 20)).shape == (20, 20, 3)


def test_image_folder_errors_name_the_missing_piece(tmp_path):
    folder = write_images(tmp_path / "real")
    (folder / "001.png").unlink()
    data = ImageFolder(folder, (16, 16))
    with pytest.raises(FewstepError, match="001.png"):
        data.draw(len(data) * 8, torch.Generator().manual_seed(0))
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(FewstepError, match="metadata.jsonl is missing"):
        ImageFolder(folder, (16, 16))
    with pytest.raises(FewstepError, match="not found"):
        ImageFolder(tmp_path / "nowhere", (16, 16))


def test_a_real_teacher_trains_on_the_given_prompts_and_images(linked, tmp_path, capsys):
    common = ["train", "--method", "dmd2", "--preset", "toy", "--teacher", str(linked),
              "--set", "steps=2", "batch=2", "ttur_ratio=1", "--no-progress"]
    assert main(common + ["--run-dir", str(tmp_path / "r0"), "--out", str(tmp_path / "m0")]) == 2
    assert "real sdxl teacher: give its training prompts with --train-prompts" in capsys.readouterr().err
    assert not (tmp_path / "m0").exists()
    prompts, real = write_prompts(tmp_path / "train.jsonl"), write_images(tmp_path / "real")
    # DMD2's GAN needs captioned real images: a clear error on the first draw, no model written
    assert main(common + ["--train-prompts", str(prompts), "--run-dir", str(tmp_path / "r1"),
                          "--out", str(tmp_path / "m1")]) == 2
    assert "needs real images (`fewstep train --real-data FOLDER`" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists()
    assert main(common + ["--train-prompts", str(prompts), "--real-data", str(real),
                          "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    info = json.loads((tmp_path / "model" / "student.json").read_text())
    assert info["iterations"] == 2 and info["train_prompts"] == str(prompts)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("critic/real_logit" in row for row in logged)  # the GAN saw the real images


def test_dmd_pairs_come_from_the_training_prompts(linked, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "train.jsonl")
    assert main(["pairs", "--teacher", str(linked), "--count", "2", "--steps", "1",
                 "--guidance", "2.0", "--out", str(tmp_path / "p0.safetensors")]) == 2
    assert "with --prompts" in capsys.readouterr().err
    main(["pairs", "--teacher", str(linked), "--count", "6", "--steps", "1", "--guidance", "2.0",
          "--prompts", str(prompts), "--out", str(tmp_path / "pairs.safetensors")])
    metas = json.loads((tmp_path / "pairs.json").read_text())["metas"]
    assert len(metas) == 6 and {m["prompt"] for m in metas} == set(CAPTIONS)  # cycled, all used
