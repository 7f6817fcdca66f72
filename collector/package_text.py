"""The human-readable texts of an evidence package, times in Asia/Shanghai: coverage.html, README.txt and
viewing/README.txt (collector/export.py writes them)."""

from __future__ import annotations

import html
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .batch_view import TEXT
from .batches import SHANGHAI, BatchReport

if TYPE_CHECKING:
    from .viewing import Clip


def local_iso(t: datetime) -> str:
    return t.astimezone(SHANGHAI).isoformat(timespec="seconds")


def local_text(t: datetime, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return t.astimezone(SHANGHAI).strftime(fmt)


def coverage_html(report: BatchReport, gaps: list[dict[str, Any]], exported: dict[str, Any],
                  clips: list[Clip]) -> str:
    """coverage.html: the coverage report of the batch in zh-CN, Asia/Shanghai times."""
    L = TEXT["zh"]
    e = html.escape

    def status(s: str) -> str:
        return L["gaps_status" if s == "gaps" else s]

    rows = []
    for part in report.parts:
        rows.append(f"<h2>{e(L[part.part])} {e(part.room)}（{e(L['venue'])} {e(part.venue)}）"
                    f"{e(local_text(part.start))} – {e(local_text(part.end))}，{e(L['status'])}："
                    f"<span class='s-{e(part.status)}'>{e(status(part.status))}</span></h2>")
        if not part.coverage.cameras:
            rows.append(f"<p>{e(L['no_camera'])}</p>")
        for cam in part.coverage.cameras:
            rows.append(f"<h3>{e(L['camera'])} {e(cam.camera)}：{e(L['covered'])} {cam.percent:.2f}%，"
                        f"{e(status(cam.status))}</h3>")
            if not cam.gaps:
                rows.append(f"<p>{e(L['no_gaps'])}</p>")
                continue
            rows.append(f"<table><tr><th>{e(L['gaps'])}（{e(L['tz'])}）</th><th>{e(L['seconds'])}</th>"
                        f"<th>{e(L['cause'])}</th></tr>")
            for gap in cam.gaps:
                rows.append(f"<tr><td>{e(local_text(gap.start))} – {e(local_text(gap.end, '%H:%M:%S'))}</td>"
                            f"<td>{gap.seconds:.1f}</td><td>{e('、'.join(L.get(c, c) for c in gap.causes))}</td></tr>")
            rows.append("</table>")
    clip_rows = "".join(f"<li>{e(c.path)}：{e(local_text(c.start))} – {e(local_text(c.end))}"
                        f"（序号 {c.first_seq}–{c.last_seq}）</li>" for c in clips)
    return f"""<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>{e(L['batch'])} {e(report.batch_id)} 覆盖报告</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.2em .6em}}.s-complete{{color:#070}}.s-gaps,.s-no_footage{{color:#b00}}</style>
</head><body>
<h1>{e(L['batch'])} {e(report.batch_id)} 覆盖报告</h1>
<p>{e(L['institution'])} {e(report.institution)}，{e(L['occupation'])} {e(report.occupation)}，{e(L['level'])}
{e(report.level)}，{e(L['status'])}：{e(status(report.status))}。时间均为北京时间（Asia/Shanghai），
{e(L['tolerance'])} {report.tolerance_seconds:g} 秒。</p>
<p>导出人：{e(str(exported['by']))}，导出时间：{e(local_text(datetime.fromisoformat(exported['at_local'])))}，
导出原因：{e(str(exported['reason']))}</p>
{''.join(rows)}
<h2>覆盖缺口汇总：{len(gaps)} 处</h2>
<h2>观看用视频（viewing/，流复制，在每个缺口处分段）</h2><ul>{clip_rows or '<li>无</li>'}</ul>
<p>校验：<code>python3 verify.py .</code>（只需要 Python 3 和 cryptography）：结果为 OK、OK_WITH_GAPS 或 NOT_OK。</p>
</body></html>
"""


def viewing_readme(clips: list[Clip], gaps_between: list[tuple[str, datetime, datetime]]) -> str:
    """viewing/README.txt: each clip and each gap between clips."""
    lines = ["观看用视频 / viewing copies (MP4, stream copy of the original segments, no re-encode)",
             "每个文件只含连续录像；缺口处分段。时间为北京时间 (Asia/Shanghai).",
             "Each file holds continuous footage only; files are split at every gap. Times are Asia/Shanghai.",
             "The evidence is segments/ (verified by verify.py); these files are for convenient viewing.", "",
             "片段 / clips:"]
    lines += [f"  {c.path}: {local_text(c.start)} – {local_text(c.end)} (seq {c.first_seq}–{c.last_seq})"
              for c in clips]
    lines += ["", "片段之间的缺口 / gaps between clips:"]
    lines += [f"  {camera}: {local_text(a)} – {local_text(b)} ({(b - a).total_seconds():.1f} s)"
              for camera, a, b in gaps_between] or ["  无 / none"]
    return "\n".join(lines) + "\n"


PACKAGE_README = """exam-footage 证据包 / evidence package

校验 / verify:   python3 verify.py .        (Python 3 + `pip install cryptography`)
结果 / verdict:  OK | OK_WITH_GAPS (exit 3) | NOT_OK (exit 4, each problem listed)

package.json 由采集中心密钥签名（package.sig，公钥 keys/collector.pub）；segments/ 为原始片段，逐字节一致；
viewing/ 为观看用 MP4（流复制，缺口处分段）；coverage.html 为覆盖报告（北京时间）。
package.json is signed by the collector (package.sig, key keys/collector.pub); segments/ holds the original
files bit-identical; viewing/ has stream-copied MP4s split at gaps; coverage.html is the coverage report.
"""
