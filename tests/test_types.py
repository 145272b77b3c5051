"""
Static types: mypy, as setup.cfg's C{[mypy]} section sets it up, finds no
error in the modules it checks (its C{files} list).  Run in this process
through mypy's API, with its cache in C{.mypy_cache} so that a run after the
first reads again only what changed.
"""

import os

from mypy import api
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import ROOT


class MypyTests(SynchronousTestCase):
    def test_checked_modules(self):
        """mypy passes; a failure shows its report."""
        # The config's paths are relative to the checkout.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(ROOT)
        report, errors, status = api.run(["--config-file", "setup.cfg"])
        self.assertEqual(status, 0, f"mypy found errors:\n{report}{errors}")
