"""Fixtures of the reliability suite (tests/conftest.py's fixtures are there too).

kernel_log_is_clean: the kernel log position is taken before the first test
of this directory and, after the last one, no new line may look like a
WARN, BUG, Oops or other splat. Lines of other engineers' tests on this host
would count too: a splat is worth a look whoever caused it.
"""

import pytest

from support import hostenv

from . import kit


@pytest.fixture(scope='session', autouse=True)
def kernel_log_is_clean():
    start = kit.kernel_log_position()
    yield start
    problems = kit.kernel_problems_since(start)
    assert not problems, 'the kernel logged problems during the suite:\n' + '\n'.join(problems)


@pytest.fixture(scope='module')
def redirection(tmp_path_factory):
    """Redirection converged on a child cgroup for the whole module (see kit.Redirection)."""
    with kit.Redirection(tmp_path_factory.mktemp('redirection')) as r:
        yield r


@pytest.fixture
def netns():
    with hostenv.netns(kit.PREFIX) as ns:
        yield ns
