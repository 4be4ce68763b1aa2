"Smoke tests of lesiongen.phantom: determinism, file layouts, config validation."
import numpy as np, pandas as pd, pytest
import lesiongen.phantom as phantom
from lesiongen.core import DERM7PT_CONCEPTS, LesionGenError
from lesiongen.phantom import (DERM7PT_META_COLUMNS, HAM10000_METADATA_COLUMNS, PhantomConfig, render_phantom,
                               sample_lesions, write_phantom)


def test_deterministic_table_and_pixels():
    a, b = sample_lesions(PhantomConfig.tiny(seed=3)), sample_lesions(PhantomConfig.tiny(seed=3))
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(render_phantom(a.iloc[0], 32), render_phantom(b.iloc[0], 32))
    assert not np.array_equal(render_phantom(a.iloc[0], 32), render_phantom(a.iloc[1], 32))  # not a constant image
    assert not sample_lesions(PhantomConfig.tiny(seed=4)).equals(a)
    for c, values in DERM7PT_CONCEPTS.items(): assert set(a[c]) <= set(values)


@pytest.mark.parametrize("kw,arg", [(dict(n=0), "n"), (dict(size=36), "size"), (dict(format="isic"), "format"),
                                    (dict(dx_probs={"mel": 0.3}), "dx_probs")])
def test_config_errors_name_the_argument(kw, arg):
    with pytest.raises(LesionGenError, match=rf"^{arg} must"): PhantomConfig(**kw)  # `match=arg` alone: "n" matches anything


def test_layouts(tmp_path):
    t = write_phantom(tmp_path / "ham", PhantomConfig.tiny(), progress=False)
    assert tuple(pd.read_csv(tmp_path / "ham" / "HAM10000_metadata.csv").columns) == HAM10000_METADATA_COLUMNS
    assert all((tmp_path / "ham" / f).is_file() for f in t.file_name)
    t = write_phantom(tmp_path / "d7p", PhantomConfig.tiny(format="derm7pt"), progress=False)
    meta = pd.read_csv(tmp_path / "d7p" / "meta" / "meta.csv")
    assert tuple(meta.columns) == DERM7PT_META_COLUMNS and len(meta) == 16
    assert all((tmp_path / "d7p" / "images" / p).is_file() for p in list(meta.derm) + list(meta.clinic))
    assert (tmp_path / "d7p" / "phantom_truth.csv").is_file()


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_write_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    "A run that dies mid-write of an image leaves no torn image; the next run completes it byte for byte"
    cfg = PhantomConfig.tiny(format="derm7pt", n=12)
    write_phantom(tmp_path / "full", cfg, progress=False)
    real, calls = phantom._save_jpeg, []

    def dying(path, img, quality):  # the 6th image: its temp file is half written when the process dies
        calls.append(path)
        if len(calls) == 6:
            (path.parent / f".{path.name}.x.tmp").write_bytes(b"\xff\xd8\xff"); raise KeyboardInterrupt
        real(path, img, quality)
    monkeypatch.setattr(phantom, "_save_jpeg", dying)
    with pytest.raises(KeyboardInterrupt): write_phantom(tmp_path / "part", cfg, progress=False)
    monkeypatch.setattr(phantom, "_save_jpeg", real)
    assert len(list((tmp_path / "part").rglob("*.jpg"))) == 5 and not (tmp_path / "part" / "phantom_truth.csv").exists()
    write_phantom(tmp_path / "part", cfg, progress=False)
    assert _tree(tmp_path / "part") == _tree(tmp_path / "full")
    with pytest.raises(LesionGenError, match=r"other settings \(n 12 there, 13 now\)"):
        write_phantom(tmp_path / "part", PhantomConfig.tiny(format="derm7pt", n=13), progress=False)
