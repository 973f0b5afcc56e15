"""The pages under docs/ run as written: every fenced `bash` block's `audiodiff` commands go through
`audiodiff.cli.main` and every `python` block is executed, in order, with the page's own table of offline
stand-ins (its "Offline stand-ins" section) substituted, on the session's local Ray. The page's `out/` becomes a
temporary folder's absolute path: the session's Ray workers run in the directory the session started in."""

import pathlib
import re
import shlex
import shutil

import pytest

from audiodiff.cli import main

PAGE = pathlib.Path(__file__).parent.parent / "docs" / "from-the-notebook.md"


def stand_ins(page: str) -> dict[str, str]:
    section = page.split("## Offline stand-ins", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", section, re.M))


def blocks(page: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```$", page, re.M | re.S)


def commands(bash: str) -> list[str]:
    lines = bash.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_the_notebook_page_runs_as_written_on_the_stand_ins(local_ray, synthetic_audio, tmp_path, capsys):
    page = PAGE.read_text()
    substitutions = stand_ins(page)
    assert "teticio/audio-diffusion-instrumental-hiphop-256" in substitutions and "lewtun/music_genres" in substitutions
    used = set()

    def offline(code: str) -> str:
        for chapter, stand_in in substitutions.items():
            if chapter in code:
                used.add(chapter)
                code = code.replace(chapter, stand_in)
        return re.sub(r"(?<![\w/])out/", f"{tmp_path}/out/", code)

    shutil.copytree(synthetic_audio, tmp_path / "out" / "synth")  # the stand-in the page describes
    ran = []
    for language, code in blocks(page):
        if language == "bash":
            for command in commands(offline(code)):
                argv = shlex.split(command)
                assert argv[0] == "audiodiff", f"the page runs audiodiff commands only: {command}"
                code = main(argv[1:])
                printed = capsys.readouterr()
                assert code == 0, f"{command}\n{printed.out[-2000:]}{printed.err[-2000:]}"
                ran.append(argv[1])
        else:
            assert language == "python", f"a {language} block: the test runs bash and python blocks only"
            exec(compile(offline(code), f"{PAGE.name} python block", "exec"), {})
            ran.append("python")
    assert ran == ["generate", "python", "preprocess", "finetune", "generate", "evaluate", "evaluate", "python"]
    assert used == set(substitutions), f"stand-ins that match nothing on the page: {set(substitutions) - used}"
    assert (tmp_path / "out" / "electronic-model" / "loss.png").exists()
    assert (tmp_path / "out" / "electronic-clips" / "clips" / "extended-00001.wav").exists()


@pytest.mark.parametrize("link", ["docs/from-the-notebook.md"])
def test_the_readme_links_the_docs(link):
    assert f"]({link})" in (PAGE.parent.parent / "README.md").read_text()
