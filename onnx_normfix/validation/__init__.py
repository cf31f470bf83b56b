"""The validator: re-run each stage on onnxruntime and compare it with the previous stage.

One module per job (README "How validation works" says what is fed and compared):

    feeds.py       shapes that run and exercise the model, seeded draws
    worker.py      onnxruntime in a child process (`_ort_server.py`), staged copies of big models
    compare.py     element-wise comparison, fp16/bf16 judged against their own rounding
    randomness.py  random ops under control; the independent proof of replace_random
    sites.py       site-local checks for graphs too large for a whole-model session
    stages.py      the stage tracker the pipeline calls after every pass
"""

from .compare import TOLERANCES, compare, compare_draws
from .feeds import MAX_FEED_ELEMENTS, FeedPlan, FeedsUnavailable, Options, make_draws, make_feeds, real_inputs
from .randomness import cut_random, random_nodes
from .sites import check_sites, extract_region
from .stages import WHOLE_MODEL_NODES, Snapshot, Stages, run_checker
from .worker import (RuntimeCrashed, RuntimeUnavailable, Staged, run_draws, run_model, start_worker,
                     with_outputs)

__all__ = ["TOLERANCES", "compare", "compare_draws", "MAX_FEED_ELEMENTS", "FeedPlan", "FeedsUnavailable", "Options",
           "make_draws", "make_feeds", "real_inputs", "cut_random", "random_nodes", "check_sites", "extract_region",
           "WHOLE_MODEL_NODES", "Snapshot", "Stages", "run_checker", "RuntimeCrashed", "RuntimeUnavailable", "Staged",
           "run_draws", "run_model", "start_worker", "with_outputs"]
