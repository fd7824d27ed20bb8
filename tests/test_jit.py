import os
import sys

from uprlhf.jit import interpreter_tools_first


def _fake_interpreter(tmp_path, with_ninja: bool):
    tools = tmp_path / "venv" / "bin"
    tools.mkdir(parents=True)
    if with_ninja:
        (tools / "ninja").write_text("")
    return tools


def test_interpreter_tools_go_first_once_when_they_hold_ninja(tmp_path, monkeypatch):
    tools = _fake_interpreter(tmp_path, with_ninja=True)
    monkeypatch.setattr(sys, "executable", str(tools / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", str(tools), "/usr/bin"]))
    interpreter_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [str(tools), "/usr/local/bin", "/usr/bin"]
    interpreter_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [str(tools), "/usr/local/bin", "/usr/bin"]


def test_path_is_left_alone_without_a_ninja_beside_the_interpreter(tmp_path, monkeypatch):
    tools = _fake_interpreter(tmp_path, with_ninja=False)
    monkeypatch.setattr(sys, "executable", str(tools / "python"))
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    interpreter_tools_first()
    assert os.environ["PATH"] == "/usr/local/bin:/usr/bin"
