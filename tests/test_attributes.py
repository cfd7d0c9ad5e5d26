"""Attribute datasets read from tiny fixtures written in the published on-disk formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sendvae.data.attributes import _sign_rows, describe, open_attribute_dataset
from sendvae.data.images import load_and_crop
from sendvae.data.shapes import ShapesDataset
from sendvae.errors import UserError

CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
AWA2_PREDICATES = (
    "black white blue brown gray orange red yellow patches spots stripes furry hairless toughskin big small "
    "bulbous lean flippers hands hooves pads paws longleg longneck tail chewteeth meatteeth buckteeth "
    "strainteeth horns claws tusks smelly flys hops swims tunnels walks fast slow strong weak muscle bipedal "
    "quadrapedal active inactive nocturnal hibernate agility fish meat plankton vegetation insects forager "
    "grazer hunter scavenger skimmer stalker newworld oldworld arctic coastal desert bush plains forest fields "
    "jungle mountains ocean ground water tree cave fierce timid smart group solitary nestspot domestic"
).split()


def write_image(path, seed, size=(30, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, quality=95)


def signs_line(values) -> str:
    return " ".join(f"{v:>2d}" for v in values)


# ---------------------------------------------------------------------------------------------
# CelebA


def make_celeba(root, n=6, nested=False, rows_override=None):
    rng = np.random.default_rng(0)
    signs = rng.choice([-1, 1], size=(n, 40))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    image_dir = root / ("Img/img_align_celeba" if nested else "img_align_celeba")
    for i, name in enumerate(files):
        write_image(image_dir / name, i)
    rows = rows_override or [f"{name} {signs_line(s)}" for name, s in zip(files, signs)]
    attr_dir = root / "Anno" if nested else root
    part_dir = root / "Eval" if nested else root
    attr_dir.mkdir(parents=True, exist_ok=True)
    part_dir.mkdir(parents=True, exist_ok=True)
    (attr_dir / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(CELEBA_NAMES) + " \n" + "\n".join(rows) + "\n")
    partition = [0, 0, 0, 1, 2, 2][:n]
    (part_dir / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, partition)))
    return signs, files


@pytest.mark.parametrize("nested", [False, True])
def test_celeba(tmp_path, nested):
    signs, files = make_celeba(tmp_path, nested=nested)
    source = open_attribute_dataset(f"celeba:{tmp_path}", resolution=16)
    assert source.names == CELEBA_NAMES and len(source.names) == 40
    assert source.sizes() == {"train": 3, "val": 1, "test": 2}
    test = source.split("test")
    assert np.array_equal(test.attribute_matrix(), (signs[4:] > 0).astype(np.float32))
    item = test[1]
    assert item["attributes"].dtype == torch.float32 and item["attributes"].shape == (40,)
    assert torch.equal(item["attributes"], torch.from_numpy((signs[5] > 0).astype(np.float32)))
    image_dir = tmp_path / ("Img/img_align_celeba" if nested else "img_align_celeba")
    expected = load_and_crop(image_dir / files[5], 16)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    assert item["label"].item() == 0 and item["index"].item() == 1


def test_celeba_malformed_files_name_the_line(tmp_path):
    rows = ["000001.jpg " + signs_line([1] * 40), "000002.jpg " + signs_line([1] * 39)]
    make_celeba(tmp_path, n=2, rows_override=rows)
    with pytest.raises(UserError, match=r"list_attr_celeba.txt line 4: expected 40 values, found 39"):
        open_attribute_dataset(f"celeba:{tmp_path}", 16)


def test_celeba_count_line_must_match(tmp_path):
    make_celeba(tmp_path, n=3)
    text = (tmp_path / "list_attr_celeba.txt").read_text().replace("3\n", "4\n", 1)
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(UserError, match="says 4 images but 3 rows"):
        open_attribute_dataset(f"celeba:{tmp_path}", 16)


def test_celeba_path_escaping_the_root_is_refused(tmp_path):
    rows = ["000001.jpg " + signs_line([1] * 40), "../../etc/passwd " + signs_line([1] * 40)]
    make_celeba(tmp_path, n=2, rows_override=rows)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n../../etc/passwd 0\n")
    with pytest.raises(UserError, match="escapes the dataset root"):
        open_attribute_dataset(f"celeba:{tmp_path}", 16)


def test_missing_annotation_file_is_named(tmp_path):
    make_celeba(tmp_path, n=2)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match="list_eval_partition.txt"):
        open_attribute_dataset(f"celeba:{tmp_path}", 16)


# ---------------------------------------------------------------------------------------------
# AwA2


def make_awa2(root, classes=("antelope", "grizzly+bear", "killer+whale"), per_class=10):
    (root / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (root / "predicates.txt").write_text("".join(f"{i + 1}\t{p}\n" for i, p in enumerate(AWA2_PREDICATES)))
    matrix = np.random.default_rng(1).integers(0, 2, (len(classes), 85))
    (root / "predicate-matrix-binary.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in matrix))
    for c, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / "JPEGImages" / name / f"{name}_{10001 + k}.jpg", 100 * c + k)
    return matrix


def test_awa2_broadcasts_class_attributes_and_splits_each_class(tmp_path):
    matrix = make_awa2(tmp_path)
    source = open_attribute_dataset(f"awa2:{tmp_path}", 16)
    assert source.names == AWA2_PREDICATES and source.class_names == ["antelope", "grizzly+bear", "killer+whale"]
    assert source.sizes() == {"train": 21, "val": 3, "test": 6}  # 7 / 1 / 2 of each class's 10
    all_paths = []
    for split in ("train", "val", "test"):
        ds = source.split(split)
        per_class = {"train": 7, "val": 1, "test": 2}[split]
        assert np.bincount(ds.labels, minlength=3).tolist() == [per_class] * 3
        assert np.array_equal(ds.attribute_matrix(), matrix[ds.labels].astype(np.float32))
        for path, label in zip(ds.paths, ds.labels):
            assert path.startswith(source.class_names[label] + "/")
        all_paths.extend(ds.paths)
    assert len(set(all_paths)) == 30  # disjoint and complete
    again = open_attribute_dataset(f"awa2:{tmp_path}", 16)
    assert again.split("test").paths == source.split("test").paths  # deterministic
    item = source.split("val")[0]
    assert item["label"].item() == 0 and torch.equal(item["attributes"], torch.from_numpy(matrix[0].astype(np.float32)))


def test_awa2_matrix_shape_is_checked(tmp_path):
    make_awa2(tmp_path)
    (tmp_path / "predicate-matrix-binary.txt").write_text("0 1\n")
    with pytest.raises(UserError, match="expected 3 rows of 85 values"):
        open_attribute_dataset(f"awa2:{tmp_path}", 16)


# ---------------------------------------------------------------------------------------------
# DeepFashion


def make_deepfashion(root, values, partition, escape=False):
    names = [f"attr {k:04d} print" for k in range(1000)]
    anno, evaluation = root / "Anno", root / "Eval"
    anno.mkdir(parents=True)
    evaluation.mkdir()
    (anno / "list_attr_cloth.txt").write_text(
        "1000\nattribute_name  attribute_type\n" + "".join(f"{n:<30}{1 + k % 5}\n" for k, n in enumerate(names)))
    files = [f"img/Sheer_Pleated-Front_Blouse/img_{k + 1:08d}.jpg" for k in range(len(values))]
    if escape:
        files[-1] = "img/../../outside.jpg"
    (anno / "list_attr_img.txt").write_text(
        f"{len(files)}\nimage_name  attribute_labels\n"
        + "".join(f"{f:<60}{signs_line(v)}\n" for f, v in zip(files, values)))
    (evaluation / "list_eval_partition.txt").write_text(
        f"{len(files)}\nimage_name  evaluation_status\n" + "".join(f"{f:<60}{p}\n" for f, p in zip(files, partition)))
    (anno / "list_category_cloth.txt").write_text(
        "50\ncategory_name  category_type\n" + "".join(f"Category{k:<10}{1 + k % 3}\n" for k in range(50)))
    (anno / "list_category_img.txt").write_text(
        f"{len(files)}\nimage_name  category_label\n" + "".join(f"{f:<60}{3 + k}\n" for k, f in enumerate(files)))
    for k, f in enumerate(files):
        if not escape or k < len(files) - 1:
            write_image(root / "Img" / f, k)
    return names, files


def test_deepfashion(tmp_path):
    values = np.random.default_rng(2).choice([-1, 1], size=(5, 1000))
    values[1, 7] = 0  # "unknown"
    names, files = make_deepfashion(tmp_path, values, ["train", "train", "val", "test", "test"])
    source = open_attribute_dataset(f"deepfashion:{tmp_path}", 16)
    assert len(source.names) == 1000 and source.names[3] == "attr 0003 print"
    assert source.sizes() == {"train": 2, "val": 1, "test": 2}
    assert len(source.class_names) == 50
    train = source.split("train").attribute_matrix()
    assert np.isnan(train[1, 7]) and np.isnan(train).sum() == 1
    expected = np.where(values[:2] > 0, 1.0, 0.0)
    mask = ~np.isnan(train)
    assert np.array_equal(train[mask], expected[mask])
    item = source.split("test")[1]
    assert item["label"].item() == 3 + 4 - 1  # category 7 in the file (1-based)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), load_and_crop(tmp_path / "Img" / files[4], 16))


def test_deepfashion_escape_is_refused(tmp_path):
    values = np.ones((2, 1000), dtype=int)
    make_deepfashion(tmp_path, values, ["train", "test"], escape=True)
    with pytest.raises(UserError, match="escapes the dataset root"):
        open_attribute_dataset(f"deepfashion:{tmp_path}", 16)


def test_sign_rows_rejects_values_other_than_minus_one_zero_one(tmp_path):
    with pytest.raises(UserError, match="line 5: values must be -1, 0 or 1"):
        _sign_rows(["1 -1", "1 2"], 2, tmp_path / "f.txt", first_line=4)
    with pytest.raises(UserError, match="line 3: values must be"):
        _sign_rows(["10 1"], 2, tmp_path / "f.txt", first_line=3)
    got = _sign_rows([" 1 -1  0", "-1 -1  1"], 3, tmp_path / "f.txt", first_line=1)
    assert np.array_equal(got, np.array([[1, 0, np.nan], [0, 0, 1]], np.float32), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_with_split_and_label_columns(tmp_path):
    for k in range(4):
        write_image(tmp_path / "pics" / f"{k}.png", k)
    (tmp_path / "attrs.csv").write_text(
        "image,smiling,hat,split,label\n"
        "pics/0.png,1,0,train,2\n"
        "pics/1.png,0,,train,0\n"
        "pics/2.png,1,1,val,1\n"
        "pics/3.png,0,1,test,2\n")
    source = open_attribute_dataset(f"csv:{tmp_path / 'attrs.csv'}", 16)
    assert source.names == ["smiling", "hat"] and source.sizes() == {"train": 2, "val": 1, "test": 1}
    train = source.split("train")
    assert np.array_equal(train.attribute_matrix(), np.array([[1, 0], [0, np.nan]], np.float32), equal_nan=True)
    assert train[0]["label"].item() == 2 and source.num_classes == 3
    assert np.array_equal(source.split("test")[0]["image"].permute(1, 2, 0).numpy(),
                          load_and_crop(tmp_path / "pics/3.png", 16))


def test_csv_without_split_is_a_seeded_70_10_20_split(tmp_path):
    rows = "".join(f"img{k}.png,{k % 2}\n" for k in range(20))
    (tmp_path / "a.csv").write_text("path,bit\n" + rows)
    first = open_attribute_dataset(f"csv:{tmp_path / 'a.csv'}", 16)
    second = open_attribute_dataset(f"csv:{tmp_path / 'a.csv'}", 16)
    assert first.sizes() == {"train": 14, "val": 2, "test": 4}
    assert first.split("val").paths == second.split("val").paths
    together = first.split("train").paths + first.split("val").paths + first.split("test").paths
    assert sorted(together) == sorted(f"img{k}.png" for k in range(20))


@pytest.mark.parametrize("row, message", [
    ("x.png,2", r"line 2, column 'bit': expected 0, 1 or empty"),
    ("../up.png,1", "escapes the dataset root"),
    ("/etc/passwd,1", "escapes the dataset root"),
    ("x.png,1,extra", "3 columns, the header has 2"),
])
def test_csv_errors_name_the_problem(tmp_path, row, message):
    (tmp_path / "bad.csv").write_text(f"path,bit\n{row}\n")
    with pytest.raises(UserError, match=message):
        open_attribute_dataset(f"csv:{tmp_path / 'bad.csv'}", 16)


# ---------------------------------------------------------------------------------------------
# shapes and specs


def test_shapes_attribute_dataset_splits_by_index():
    source = open_attribute_dataset("shapes:100@5", 16)
    assert len(source.names) == 49 and source.sizes() == {"train": 70, "val": 10, "test": 20}
    val = source.split("val")
    assert torch.equal(val[0]["image"], ShapesDataset(100, 16, seed=5)[70]["image"])
    matrix = val.attribute_matrix()
    assert np.array_equal(matrix, torch.stack([val[i]["attributes"] for i in range(10)]).numpy())
    assert describe(source)["sizes"]["test"] == 20


def test_bad_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="celeba:ROOT"):
        open_attribute_dataset("imagenet:/x", 16)
    with pytest.raises(UserError, match="does not exist"):
        open_attribute_dataset(f"awa2:{tmp_path / 'nope'}", 16)
    with pytest.raises(UserError, match="unknown split"):
        open_attribute_dataset("shapes:10", 16).split("training")
