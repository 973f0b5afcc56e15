import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.gallery import gallery_html, side_by_side_html

RATE = 22050


def clip(clip_id, kind, frames, **extra):
    seconds = 512 * (frames - 1) / RATE
    return {"clip_id": clip_id, "seed": 7, "kind": kind, "frames": frames, "seconds": seconds,
            "scheduler": "ddim", "steps": 50, "model": "tiny", "wav": f"clips/{clip_id}.wav",
            "png": f"clips/{clip_id}.png", **extra}


def write_files(folder, rows):
    """Real PNGs and WAVs where the rows say, so that a browser has something to load."""
    rng = np.random.default_rng(0)
    for row in rows:
        (folder / row["wav"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / row["png"]).write_bytes(png_bytes(rng.integers(0, 256, (64, row["frames"]), dtype=np.uint8)))
        (folder / row["wav"]).write_bytes(wav_bytes(0.1 * rng.standard_normal(round(row["seconds"] * RATE)), RATE))


# as remix, continue and interpolate write them: each input a row of kind "input" that its outputs name
TRACK = {"source": "songs/a b#1.wav", "slice": 3}
REMIX_INPUT = clip("a b#1-00003-input", "input", 64, strength=0.0, **TRACK)
LONG_INPUT = clip("c-input", "input", 64, strength=0.0, source="songs/c.wav", slice=0)
ROWS = [clip("standard-00000", "standard", 64, genre="drone"), clip("standard-00001", "standard", 64, genre="beats"),
        clip("extended-00000", "extended", 256),
        REMIX_INPUT,
        *[clip(f"a b#1-00003-v0{k}", "remix", 64, strength=0.5, keep_start=0.5 * (k == 0), keep_end=0.0,
               input_wav=REMIX_INPUT["wav"], input_png=REMIX_INPUT["png"], **TRACK) for k in range(2)],
        LONG_INPUT,
        clip("c-continued", "continuation", 256, source="songs/c.wav", slice=0, input_wav=LONG_INPUT["wav"],
             input_png=LONG_INPUT["png"], genre=None, strength=None),
        clip("a-input", "input", 64, source="a.wav", slice=0), clip("b-input", "input", 64, source="b.wav", slice=0),
        *[clip(f"interpolation-00{i}", "interpolation", 64, position=i / 2) for i in range(3)]]


def test_gallery_groups_by_kind_genre_and_input_and_shows_each_clip_settings():
    page = gallery_html("a title & more", ROWS)
    headings = re.findall(r"<h3>(.*?)</h3>", page)
    assert headings == ["standard clips · genre drone (1)", "standard clips · genre beats (1)", "extended clips (1)",
                        "remix clips · from songs/a b#1.wav · slice 3 (2)",
                        "continuation clips · from songs/c.wav · slice 0 (1)", "input clips (2)",
                        "interpolation clips (3)"]
    assert "a title &amp; more" in page and "model tiny · ddim 50 steps · 13 clips" in page
    remix = page[page.index("remix clips"):page.index("continuation clips")]
    # the input first (its player and spectrogram over its own time axis), its outputs beside it with their settings
    assert remix.index('src="clips/a%20b%231-00003-input.wav"') < remix.index('src="clips/a%20b%231-00003-v00.wav"')
    assert remix.count('src="clips/a%20b%231-00003-input.png"') == 1 and remix.count('class="axis"') == 3
    assert "1.46 s · seed 7 · strength 0.5 · keeps the first 0.5 s<" in remix
    assert "1.46 s · seed 7 · strength 0.5<" in remix
    interpolation = page[page.index("input clips (2)"):]
    assert "1.46 s · from a.wav · slice 0" in interpolation and "position 0.5 from A to B" in interpolation
    # a time axis in seconds under each clip: the extended clip's 5.9 s get ticks 0 s .. 5
    extended = page[page.index("extended clips"):page.index("remix clips")]
    assert re.findall(r'<span style="left:[\d.]+%">(\d+)', extended) == ["0", "1", "2", "3", "4", "5"]
    # self-contained: no script, no stylesheet or font from anywhere
    assert not re.search(r"<script|<link|https?:|@import|url\(", page)


def test_an_input_known_only_by_its_files_shows_without_a_time_axis():
    output = {**ROWS[4], "input_wav": "elsewhere/in.wav", "input_png": "elsewhere/in.png"}
    page = gallery_html("remix", [output])
    assert '<b>input</b></figcaption><div class="spec"><img src="elsewhere/in.png" alt="spectrogram of the input">' \
        '</div>' in page


def test_a_long_clip_is_drawn_at_most_so_wide_with_ticks_it_can_label():
    long = {**clip("long-00000", "long", 256), "seconds": 300.0}
    page = gallery_html("five minutes", [ROWS[0], long])
    assert re.findall(r'style="width:(\d+)px"', page) == ["240", "1600"]
    ticks = re.findall(r'<span style="left:[\d.]+%">(\d+)', page[page.index("long clips"):])
    assert ticks == [str(t) for t in range(0, 300, 10)]


def test_side_by_side_sets_share_one_time_scale():
    page = side_by_side_html("before and after", {"untrained: 9.0": ROWS[:1], "fine-tuned: 1.0": ROWS[2:3]})
    assert re.findall(r"<h2>(.*?)</h2>", page) == ["untrained: 9.0", "fine-tuned: 1.0"]
    widths = [int(w) for w in re.findall(r'style="width:(\d+)px"', page)]
    assert widths[1] == pytest.approx(widths[0] * 255 / 63, abs=1)


def chromium() -> str:
    """The browser the gallery is checked in: $AUDIODIFF_CHROMIUM, else chromium from the system packages
    (`.ci/run` installs it where it can)."""
    found = os.environ.get("AUDIODIFF_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if not found:
        pytest.skip("no Chromium to load the gallery in: apt-get install chromium (Debian/Ubuntu), "
                    "or set AUDIODIFF_CHROMIUM to a Chrome or Chromium binary")
    return found


# Appended to a copy of the page: once the page has loaded, waits for every player's metadata and reports
# what the browser made of each image and player.
CHECK = """<script>
addEventListener("load", async () => {
  const audios = [...document.querySelectorAll("audio")];
  await Promise.all(audios.map(a => a.readyState >= 1 ? 0 : new Promise(done => {
    a.addEventListener("loadedmetadata", done); a.addEventListener("error", done); })));
  const out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.getAttribute("src"), i.naturalWidth, i.getBoundingClientRect().width]),
    players: audios.map(a => [a.getAttribute("src"), a.duration, a.readyState])});
  document.body.append(out);
});
</script>"""


def load_in_chromium(page_path, tmp_path) -> dict:
    checked = page_path.with_name("gallery-check.html")
    checked.write_text(page_path.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000",
         "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    result = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert result, f"the check script did not report; the page as loaded:\n{dom[-2000:]}"
    return json.loads(result[1].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def test_gallery_images_and_players_load_in_a_real_browser(tmp_path):
    write_files(tmp_path, ROWS)
    (tmp_path / "index.html").write_text(gallery_html("gallery", ROWS))
    loaded = load_in_chromium(tmp_path / "index.html", tmp_path)
    assert len(loaded["images"]) == len(loaded["players"]) == len(ROWS)
    for src, natural_width, shown_width in loaded["images"]:
        assert natural_width > 0 and shown_width > 0, src
    seconds = {r["wav"]: r["seconds"] for r in ROWS}
    for src, duration, ready in loaded["players"]:
        assert ready >= 1 and duration > 0, src
        if src in seconds:
            assert duration == pytest.approx(seconds[src], abs=0.01)
