"""The instance engine (plugins/module_utils/instance.py) run in a process of its own, as the
module and the boot command run it: to run two at once, to stop one between two steps
(instance.PAUSE_ENV), and to kill -9 it there."""

import base64
import json
import os
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, '.venv', 'collections')
BPF_SOURCES = os.path.join(REPO, 'files', 'bpf')
PYTHON = '/usr/bin/python3'

DRIVER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
if os.environ.get('SRTEST_HIDE_BCC'):
    sys.modules['bcc'] = None  # a host without python3-bpfcc: import bcc fails
from ansible_collections.ebpf.sockredir.plugins.module_utils import instance
from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, libbpf
# What a kernel or a libbpf cannot be made to lack on demand: features reported
# missing (SRTEST_FEATURES_OFF=a,b) and functions libbpf.so.1 lacks (SRTEST_LIBBPF_MISSING=f,g).
if os.environ.get('SRTEST_FEATURES_OFF'):
    real_features = facts.features
    facts.features = lambda: dict(real_features(), **{k: False for k in os.environ['SRTEST_FEATURES_OFF'].split(',')})
if os.environ.get('SRTEST_LIBBPF_MISSING'):
    libbpf.missing_functions = lambda: os.environ['SRTEST_LIBBPF_MISSING'].split(',')
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError
params = json.loads(sys.stdin.read())
try:
    result = instance.converge(params, check_mode=params.pop('_check', False))
except BpfError as e:
    print(json.dumps(dict(failed=True, msg=e.msg, refusals=e.details.get('refusals', []))))
    sys.exit(1)
result['facts'].pop('features', None)
print(json.dumps(result, default=str))
'''


def sources():
    """The BPF C sources (the bcc loader's), as the role passes them."""
    return {name: open(os.path.join(BPF_SOURCES, name)).read() for name in sorted(os.listdir(BPF_SOURCES))
            if name.endswith(('.c', '.h'))}


def object_b64():
    """The prebuilt object (the object loader's), as the role passes it."""
    with open(os.path.join(BPF_SOURCES, 'sockredir.bpf.o'), 'rb') as f:
        return base64.b64encode(f.read()).decode()


class Run(object):
    """One engine run in its own process (and process group)."""

    def __init__(self, params, pause_at=None, workdir='/tmp', hide_bcc=False, env_extra=None):
        env = dict(os.environ, SRTEST_HIDE_BCC='1' if hide_bcc else '', **(env_extra or {}))
        self.gate = None
        if pause_at:
            self.gate = os.path.join(str(workdir), 'pause-%d-%s' % (time.monotonic_ns(), pause_at.replace(' ', '_')))
            open(self.gate, 'w').close()
            env['SOCKREDIR_PAUSE'] = '%s:%s' % (pause_at, self.gate)
        self.proc = subprocess.Popen([PYTHON, '-c', DRIVER, COLLECTIONS], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.proc.stdin.write(json.dumps(params))
        self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not flush it again

    def wait_paused(self, timeout=120):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.gate + '.reached'):
            if self.proc.poll() is not None:
                raise AssertionError('the engine ended before its pause: rc %s, %s %s'
                                     % (self.proc.returncode, self.proc.stdout.read(), self.proc.stderr.read()))
            if time.monotonic() > deadline:
                raise TimeoutError('the engine did not reach its pause in %ss' % timeout)
            time.sleep(0.02)

    def resume(self):
        os.unlink(self.gate)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._drop_gate()

    def result(self, timeout=300):
        out, err = self.proc.communicate(timeout=timeout)
        self._drop_gate()
        data = json.loads(out) if out.strip() else None
        return self.proc.returncode, data, err

    def _drop_gate(self):
        for path in (self.gate, self.gate and self.gate + '.reached'):
            if path and os.path.exists(path):
                os.unlink(path)


def run(params, **kwargs):
    """(rc, result or failure dict, stderr) of one complete run."""
    return Run(params, **kwargs).result()


def kill_all(runs):
    for r in runs:
        if r.proc.poll() is None:
            r.kill()
    return runs
