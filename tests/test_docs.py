"""The README's and docs' commands do what the text says, from where a user runs them."""
import json
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT


def read(name):
    with open(os.path.join(REPO_ROOT, name)) as f:
        return f.read()


def test_the_readme_evaluates_and_plots_the_demo_it_runs():
    """The sentence after the demo names the demo's own folder: the bare commands
    read result/, where the demo does not write."""
    text = read('README.md')
    demo = re.search(r'```bash\n(\.venv/bin/python train\.py [^`]*--dataset fashion-mnist'
                     r'[^`]*)```', text)
    assert demo, 'no demo'
    out = re.search(r'--out (\S+)', demo.group(1)).group(1)
    after = text[demo.end():].split('\n\n', 2)[1]
    evaluate = re.search(r'`(\S*python evaluate\.py[^`]*)`', after)
    plot = re.search(r'`(\S*python plot_curves\.py[^`]*)`', after)
    assert evaluate and plot, after
    assert evaluate.group(1).split()[2:] == [out]
    assert plot.group(1).split()[2] == out and '--out %s/' % out in plot.group(1)


def test_the_decouple_example_runs_elsewhere_in_its_own_folder(tmp_path):
    """docs/DECOUPLE.md's block, run as a user would (a fresh Python, in a folder of
    their own, without this repository on the path: the package comes from
    setup.sh's editable install), next to a train.py run in result/: that run is
    untouched and the example logs into its own folder."""
    text = read(os.path.join('docs', 'DECOUPLE.md'))
    start = text.index('```python\n') + len('```python\n')
    code = text[start:text.index('\n```', start)]
    run = tmp_path / 'result'
    run.mkdir()
    files = {'args.json': '{"method": "vfbn"}\n', 'log': '[{"iteration": 1}]\n'}
    for name, content in files.items():
        (run / name).write_text(content)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {n: (run / n).read_text() for n in files} == files
    assert sorted(os.listdir(str(run))) == sorted(files)
    log = [p for p in tmp_path.rglob('log') if p.parent != run]
    assert len(log) == 1 and log[0].parent.parent == tmp_path, log
    assert [e['iteration'] for e in json.loads(log[0].read_text())] == [20, 40, 60]
