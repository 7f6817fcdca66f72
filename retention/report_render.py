"""The period audit report (retention/report.py gathers it) as JSON, CSV and zh-CN HTML, times in Asia/Shanghai,
and writing it to a file."""

from __future__ import annotations

import csv
import html
import io
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from exam_contract.canonical import format_time

from .policy import SHANGHAI

if TYPE_CHECKING:
    from .report import AuditReport, Outage

CAUSES_ZH = {
    "camera_unreachable": "摄像头无法连接", "recorder_crashed": "录像进程崩溃", "corrupt_segment": "片段损坏",
    "disk_full": "磁盘已满", "agent_stopped": "采集端已停止", "missing_seq": "片段序号缺失",
    "rejected_upload": "上传被拒收", "deleted_by_retention": "保存期满已删除", "clock_unsynced": "时钟未同步",
    "clock_suspect": "时钟可疑",
    "health_black": "黑屏", "health_frozen": "画面冻结", "health_obstructed": "画面遮挡", "unknown": "原因不明",
}
STATUS_ZH = {"complete": "完整", "gaps": "有缺口", "no_footage": "无录像", "pending": "待定（未结束或上传中）"}
PART_ZH = {"theory": "理论知识考场", "practical": "操作技能考场"}


def local(moment: datetime | None) -> str:
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") if moment else "—"


def _t(moment: datetime | None) -> str | None:
    return format_time(moment) if moment else None


def report_json(r: AuditReport) -> dict:
    return {
        "period": {"from": r.first_day.isoformat(), "to": r.last_day.isoformat(), "timezone": "Asia/Shanghai",
                   "start": _t(r.start), "end": _t(r.end)},
        "generated_at": _t(r.generated_at),
        "totals": {"institutions": r.totals.institutions, "venues": r.totals.venues, "batches": r.totals.batches,
                   "parts": r.totals.parts, "parts_with_gaps": r.totals.parts_with_gaps,
                   "part_status": r.totals.part_status, "cameras": r.totals.cameras, "gaps": r.totals.gaps,
                   "gap_seconds": r.totals.gap_seconds, "clock_suspect_records": r.totals.clock_suspect_records},
        "parts": [{"batch_id": p.batch_id, "institution": p.institution, "occupation": p.occupation,
                   "level": p.level, "part": p.part, "venue": p.venue, "room": p.room, "start": _t(p.start),
                   "end": _t(p.end), "start_local": local(p.start), "end_local": local(p.end), "status": p.status,
                   "cameras": p.cameras, "covered_percent": p.covered_percent, "gaps": p.gaps} for p in r.parts],
        "gaps": [{"source": g.source, "institution": g.institution, "venue": g.venue, "camera": g.camera,
                  "room": g.room, "batch_id": g.batch_id, "part": g.part, "start": _t(g.start), "end": _t(g.end),
                  "start_local": local(g.start) if g.start else None, "end_local": local(g.end) if g.end else None,
                  "seconds": round(g.seconds, 3), "causes": list(g.causes), "missing_seqs": g.seqs} for g in r.gaps],
        "cameras": [{"institution": c.institution, "venue": c.venue, "camera": c.camera, "rooms": list(c.rooms),
                     "segments": c.segments, "gap_records": c.gap_records, "seconds_recorded": c.seconds_recorded,
                     "missing_seqs": list(c.missing_seqs),
                     "outages": [{"start": _t(o.start), "end": _t(o.end), "cause": o.cause} for o in c.outages]}
                    for c in r.cameras],
        "clock_suspect": [{"institution": c.institution, "venue": c.venue, "camera": c.camera, "records": c.records,
                           "first_stored_at": _t(c.first_stored), "last_stored_at": _t(c.last_stored),
                           "first_stored_local": local(c.first_stored), "last_stored_local": local(c.last_stored),
                           "claimed_start": _t(c.claimed_start), "claimed_end": _t(c.claimed_end),
                           "seqs": list(c.seqs)} for c in r.clock_suspect],
    }


CSV_COLUMNS = ["row", "batch_id", "institution", "venue", "room", "camera", "part", "start_local", "end_local",
               "status", "seconds", "causes", "missing_seqs"]


def report_csv(r: AuditReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for p in r.parts:
        writer.writerow(["part", p.batch_id, p.institution, p.venue, p.room, "", p.part, local(p.start), local(p.end),
                         p.status, round((p.end - p.start).total_seconds(), 3), "", ""])
    for g in r.gaps:
        writer.writerow(["gap", g.batch_id or "", g.institution, g.venue, g.room, g.camera, g.part or "",
                         local(g.start), local(g.end), "", round(g.seconds, 3), ";".join(g.causes), g.seqs or ""])
    for c in r.clock_suspect:  # start/end: first and last arrival at the collector (its clock)
        writer.writerow(["clock_suspect", "", c.institution, c.venue, "", c.camera, "", local(c.first_stored),
                         local(c.last_stored), f"{c.records} records", "", "clock_suspect",
                         ",".join(str(s) for s in c.seqs)])
    writer.writerow(["total", "", r.totals.institutions, r.totals.venues, "", r.totals.cameras, r.totals.parts, "", "",
                     f"{r.totals.parts_with_gaps} parts with gaps", r.totals.gap_seconds, f"{r.totals.gaps} gaps", ""])
    return out.getvalue()


def _causes_zh(causes: tuple[str, ...]) -> str:
    return "、".join(CAUSES_ZH.get(c, c) for c in causes)


def _outages_zh(outages: tuple[Outage, ...]) -> str:
    return "、".join(f"{local(o.start)}–{local(o.end)} {CAUSES_ZH.get(o.cause, o.cause)}" for o in outages)


def report_html(r: AuditReport) -> str:
    e = html.escape
    t = r.totals
    rows_parts = "".join(
        f"<tr class=\"{e(p.status)}\"><td>{e(p.batch_id)}</td><td>{e(p.institution)}</td><td>{e(p.occupation)}</td>"
        f"<td>{e(p.level)}</td><td>{e(PART_ZH.get(p.part, p.part))}</td><td>{e(p.venue)}</td><td>{e(p.room)}</td>"
        f"<td>{e(local(p.start))} 至 {e(local(p.end))}</td><td>{p.cameras}</td><td>{p.covered_percent:.2f}%</td>"
        f"<td>{e(STATUS_ZH.get(p.status, p.status))}</td><td>{p.gaps}</td></tr>" for p in r.parts) \
        or "<tr><td colspan=\"12\">本期间无考试批次</td></tr>"
    rows_gaps = "".join(
        f"<tr><td>{'批次缺口' if g.source == 'batch' else '序号缺失'}</td><td>{e(g.institution)}</td>"
        f"<td>{e(g.venue)}</td>"
        f"<td>{e(g.batch_id or '—')}</td><td>{e(g.room)}</td><td>{e(g.camera)}</td><td>{e(local(g.start))}</td>"
        f"<td>{e(local(g.end))}</td><td>{g.seconds:.0f}</td><td>{e(_causes_zh(g.causes))}</td>"
        f"<td>{e(g.seqs or '')}</td></tr>" for g in r.gaps) or "<tr><td colspan=\"11\">未发现缺口</td></tr>"
    rows_cams = "".join(
        f"<tr><td>{e(c.institution)}</td><td>{e(c.venue)}</td><td>{e(c.camera)}</td><td>{e('、'.join(c.rooms))}</td>"
        f"<td>{c.segments}</td><td>{c.seconds_recorded:.0f}</td><td>{c.gap_records}</td>"
        f"<td>{e(_outages_zh(c.outages) or '—')}</td>"
        f"<td>{e(','.join(str(s) for s in c.missing_seqs) or '—')}</td></tr>" for c in r.cameras) \
        or "<tr><td colspan=\"9\">本期间无录像记录</td></tr>"
    rows_suspect = "".join(
        f"<tr class=\"suspect\"><td>{e(c.institution)}</td><td>{e(c.venue)}</td><td>{e(c.camera)}</td>"
        f"<td>{c.records}</td><td>{e(local(c.first_stored))}</td><td>{e(local(c.last_stored))}</td>"
        f"<td>{e(local(c.claimed_start))} 至 {e(local(c.claimed_end))}</td>"
        f"<td>{e(','.join(str(s) for s in c.seqs))}</td></tr>" for c in r.clock_suspect) \
        or "<tr><td colspan=\"8\">未发现时钟可疑的录像</td></tr>"
    status_text = "，".join(f"{STATUS_ZH.get(k, k)} {v}" for k, v in t.part_status.items()) or "—"
    verdict = "发现覆盖缺口" if t.gaps else "未发现覆盖缺口"
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>考试录像覆盖审计报告 {r.first_day}–{r.last_day}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #999;padding:4px 8px;font-size:14px}}th{{background:#eee}}
tr.gaps td,tr.no_footage td{{background:#fde2e2}}tr.complete td{{background:#e6f4e6}}
tr.suspect td{{background:#fff3cd}}</style></head>
<body>
<h1>考试录像覆盖审计报告</h1>
<p>审计期间：{r.first_day} 至 {r.last_day}（北京时间）　生成时间：{e(local(r.generated_at))}（北京时间）</p>
<p><strong>结论：{verdict}</strong></p>
<h2>汇总</h2>
<table><tr><th>鉴定机构</th><th>备案场所</th><th>批次</th><th>考场部分</th><th>有缺口的部分</th><th>摄像头</th>
<th>缺口数</th><th>缺口总时长（秒）</th><th>部分状态</th></tr>
<tr><td>{t.institutions}</td><td>{t.venues}</td><td>{t.batches}</td><td>{t.parts}</td><td>{t.parts_with_gaps}</td>
<td>{t.cameras}</td><td>{t.gaps}</td><td>{t.gap_seconds:.0f}</td><td>{e(status_text)}</td></tr></table>
<h2>各批次状态</h2>
<table><tr><th>批次</th><th>机构代码</th><th>职业（工种）</th><th>等级</th><th>考场类型</th><th>备案场所</th><th>考场</th>
<th>考试时间</th><th>摄像头</th><th>覆盖率</th><th>状态</th><th>缺口数</th></tr>
{rows_parts}</table>
<h2>缺口及原因</h2>
<table><tr><th>类型</th><th>机构代码</th><th>备案场所</th><th>批次</th><th>考场</th><th>摄像头</th><th>开始</th><th>结束</th>
<th>时长（秒）</th><th>原因</th><th>缺失序号</th></tr>
{rows_gaps}</table>
<h2>各摄像头录像连续性</h2>
<table><tr><th>机构代码</th><th>备案场所</th><th>摄像头</th><th>考场</th><th>片段数</th><th>录像秒数</th><th>中断记录</th>
<th>中断（时间、原因）</th><th>缺失序号</th></tr>
{rows_cams}</table>
<h2>时钟可疑</h2>
<p>以下录像自报的时间与采集服务器接收时间相差过大，采集端时钟不可信：录像照常保存（保留期自其结束时间与接收时间中较晚者起算），
与之相邻的缺口注明“时钟可疑”。请校准该采集端的时间（NTP）。</p>
<table><tr><th>机构代码</th><th>备案场所</th><th>摄像头</th><th>时钟可疑片段数</th><th>首次接收（北京时间）</th>
<th>最后接收（北京时间）</th><th>片段自报时间</th><th>序号</th></tr>
{rows_suspect}</table>
</body></html>
"""


def write_report(report: AuditReport, fmt: str, out: Path) -> None:
    if fmt == "json":
        text = json.dumps(report_json(report), ensure_ascii=False, indent=2) + "\n"
    elif fmt == "csv":
        text = report_csv(report)
    else:
        text = report_html(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
