"""Each real offline data source, fetched and converted from its pinned registry archive.

These are the only tests that read real archives (every other test runs on fixture data). A
test skips, loudly and naming the package and the fix, only when the registry answers that it
does not serve the archive; anything else (a changed file, a converter that breaks) fails.
``.ci/run`` points ``L2VG_CACHE`` at a new folder, so CI downloads them as a new machine would.
"""

from __future__ import annotations

import pandas as pd
import pytest

from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS, prepare_dataset
from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS, build_offline_task
from l2vg_ray.models.resolver import default_cache_dir
from l2vg_ray.packaged_data import ArchiveUnavailable
from l2vg_ray.testing import skip_if_not_served

ROWS = {"stsb": 1379, "trec": 5952, "rotten_tomatoes": 12808, "bbc_news": 2225, "sms_spam": 4837,
        "disaster_tweets": 7613, "snli": 9824, "movie_dialog": 29816}


@pytest.mark.parametrize("name", OFFLINE_DATASETS.names())
def test_real_data_source_converts_and_its_tasks_load(name):
    try:
        path = prepare_dataset(name, default_cache_dir())
    except ArchiveUnavailable as e:
        skip_if_not_served(e)
    df = pd.read_parquet(path)
    if name in ROWS:
        assert len(df) == ROWS[name]
    else:
        assert len(df) > 100
    tasks = [t for t in OFFLINE_TASKS.names() if OFFLINE_TASKS.get(t).data_file == name]
    assert tasks, f"data set {name} is used by no task"
    for t in tasks:
        task = build_offline_task(t, data_dir=path.parent, max_docs=50, seed=0)
        task.load_data()
        assert task.data_loaded
