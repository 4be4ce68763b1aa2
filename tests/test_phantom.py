"Smoke tests of lesiongen.phantom: determinism, file layouts, config validation."
import numpy as np, pandas as pd, pytest
from lesiongen.core import DERM7PT_CONCEPTS, LesionGenError
from lesiongen.phantom import (DERM7PT_META_COLUMNS, HAM10000_METADATA_COLUMNS, PhantomConfig, render_phantom,
                               sample_lesions, write_phantom)


def test_deterministic_table_and_pixels():
    a, b = sample_lesions(PhantomConfig.tiny(seed=3)), sample_lesions(PhantomConfig.tiny(seed=3))
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(render_phantom(a.iloc[0], 32), render_phantom(b.iloc[0], 32))
    assert not sample_lesions(PhantomConfig.tiny(seed=4)).equals(a)
    for c, values in DERM7PT_CONCEPTS.items(): assert set(a[c]) <= set(values)


@pytest.mark.parametrize("kw,arg", [(dict(n=0), "n"), (dict(size=36), "size"), (dict(format="isic"), "format"),
                                    (dict(dx_probs={"mel": 0.3}), "dx_probs")])
def test_config_errors_name_the_argument(kw, arg):
    with pytest.raises(LesionGenError, match=arg): PhantomConfig(**kw)


def test_layouts(tmp_path):
    t = write_phantom(tmp_path / "ham", PhantomConfig.tiny(), progress=False)
    assert tuple(pd.read_csv(tmp_path / "ham" / "HAM10000_metadata.csv").columns) == HAM10000_METADATA_COLUMNS
    assert all((tmp_path / "ham" / f).is_file() for f in t.file_name)
    t = write_phantom(tmp_path / "d7p", PhantomConfig.tiny(format="derm7pt"), progress=False)
    meta = pd.read_csv(tmp_path / "d7p" / "meta" / "meta.csv")
    assert tuple(meta.columns) == DERM7PT_META_COLUMNS and len(meta) == 16
    assert all((tmp_path / "d7p" / "images" / p).is_file() for p in list(meta.derm) + list(meta.clinic))
    assert (tmp_path / "d7p" / "phantom_truth.csv").is_file()
