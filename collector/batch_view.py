"""Readable text of batch reports and imports, zh-CN by default; times shown in Asia/Shanghai."""

from __future__ import annotations

from datetime import datetime

from .batch_coverage import BatchReport, BatchSummary
from .batch_import import ImportResult
from .batch_parse import SHANGHAI

TEXT = {
    "zh": {
        "batch": "批次", "institution": "机构", "occupation": "职业", "level": "等级", "status": "状态",
        "theory": "理论知识考场", "practical": "操作技能考场", "venue": "场所", "camera": "摄像头",
        "covered": "覆盖率", "gaps": "覆盖缺口", "no_gaps": "无覆盖缺口", "cause": "原因", "seconds": "秒",
        "no_camera": "该考场没有已知的摄像头", "unsynced": "时钟未同步的片段", "suspect": "时钟可疑片段",
        "parts": "考场数",
        "tz": "北京时间", "tolerance": "缺口容差", "none": "尚未导入批次",
        "imported": "已导入 {rows} 行（编码 {encoding}）：新建 {created} 个批次，"
                    "更新 {updated} 个，未变 {unchanged} 个",
        "warning": "注意",
        "complete": "完整", "gaps_status": "有缺口", "no_footage": "无录像", "pending": "进行中/待上传",
        "recorder_crashed": "录像进程崩溃", "camera_unreachable": "摄像头不可达", "corrupt_segment": "片段损坏",
        "disk_full": "磁盘已满", "agent_stopped": "采集端停止", "missing_seq": "序号缺失",
        "rejected_upload": "上传被拒收",
        "deleted_by_retention": "保存期满已删除", "clock_unsynced": "时钟未同步", "clock_suspect": "时钟可疑",
        "unknown": "原因不明",
        "health_black": "黑屏", "health_frozen": "画面冻结", "health_obstructed": "镜头遮挡",
    },
    "en": {
        "batch": "batch", "institution": "institution", "occupation": "occupation", "level": "level",
        "status": "status", "theory": "theory room", "practical": "practical room", "venue": "venue",
        "camera": "camera", "covered": "covered", "gaps": "coverage gaps", "no_gaps": "no coverage gaps",
        "cause": "cause", "seconds": "s", "no_camera": "no known camera in this room",
        "unsynced": "segments with unsynced clock", "suspect": "segments with suspect clock", "parts": "parts",
        "tz": "Asia/Shanghai",
        "tolerance": "gap tolerance", "none": "no batches imported yet",
        "imported": "imported {rows} rows (encoding {encoding}): {created} batches created, {updated} updated, "
                    "{unchanged} unchanged",
        "warning": "note",
        "complete": "complete", "gaps_status": "gaps", "no_footage": "no footage", "pending": "pending",
        "recorder_crashed": "recorder crashed", "camera_unreachable": "camera unreachable",
        "corrupt_segment": "corrupt segment", "disk_full": "disk full", "agent_stopped": "agent stopped",
        "missing_seq": "missing seq", "rejected_upload": "upload rejected",
        "deleted_by_retention": "deleted by retention", "clock_unsynced": "clock not synced",
        "clock_suspect": "agent clock suspect",
        "unknown": "unknown", "health_black": "black video", "health_frozen": "frozen video",
        "health_obstructed": "obstructed view",
    },
}


def _status(lang: str, status: str) -> str:
    return TEXT[lang]["gaps_status" if status == "gaps" else status]


def _t(t: datetime, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return t.astimezone(SHANGHAI).strftime(fmt)


def render_report(report: BatchReport, lang: str = "zh") -> str:
    L = TEXT[lang]
    lines = [f"{L['batch']} {report.batch_id}  {L['institution']} {report.institution}  "
             f"{L['occupation']} {report.occupation}  {L['level']} {report.level}  "
             f"{L['status']} {_status(lang, report.status)}  ({L['tz']}, {L['tolerance']} "
             f"{report.tolerance_seconds:g} {L['seconds']})"]
    for part in report.parts:
        end_format = '%H:%M' if part.start.date() == part.end.date() else '%Y-%m-%d %H:%M'
        span = f"{_t(part.start, '%Y-%m-%d %H:%M')}–{_t(part.end, end_format)}"
        lines.append(f"  {L[part.part]} {part.room}  {L['venue']} {part.venue}  {span}  "
                     f"{L['status']} {_status(lang, part.status)}")
        if not part.coverage.cameras:
            lines.append(f"    {L['no_camera']}")
        for cam in part.coverage.cameras:
            head = (f"    {L['camera']} {cam.camera:<20} {L['covered']} {cam.percent:6.2f}%  "
                    f"{L['status']} {_status(lang, cam.status)}  "
                    + (f"{L['gaps']} {len(cam.gaps)}" if cam.gaps else L["no_gaps"]))
            if cam.unsynced_segments:
                head += f"  {L['unsynced']} {cam.unsynced_segments}"
            if cam.suspect_segments:
                head += f"  {L['suspect']} {cam.suspect_segments}"
            lines.append(head)
            for gap in cam.gaps:
                causes = "、".join(L.get(c, c) for c in gap.causes) if lang == "zh" else \
                    ", ".join(L.get(c, c) for c in gap.causes)
                lines.append(f"      {_t(gap.start)} – {_t(gap.end, '%H:%M:%S')}  ({gap.seconds:.1f} {L['seconds']})  "
                             f"{L['cause']}: {causes}")
    return "\n".join(lines)


def render_list(items: list[BatchSummary], lang: str = "zh") -> str:
    L = TEXT[lang]
    if not items:
        return L["none"]
    return "\n".join(
        f"{b.batch_id:<20} {L['institution']} {b.institution}  {L['occupation']} {b.occupation}  {L['level']} "
        f"{b.level}  {L['parts']} {b.parts}  "
        + (f"{_t(b.first_start, '%Y-%m-%d %H:%M')} – {_t(b.last_end, '%Y-%m-%d %H:%M')}" if b.first_start and b.last_end
           else "")
        for b in items)


def render_import(result: ImportResult, lang: str = "zh") -> str:
    L = TEXT[lang]
    lines = [L["imported"].format(rows=result.rows, encoding=result.encoding, created=result.count("created"),
                                  updated=result.count("updated"), unchanged=result.count("unchanged"))]
    for change in result.batches:
        if change.changes:
            lines.append(f"  {L['batch']} {change.batch_id}: " + "; ".join(
                f"{c.field} {c.old or '-'} → {c.new or '-'}" for c in change.changes))
    lines.extend(f"  {L['warning']}: {w}" for w in result.warnings)
    return "\n".join(lines)
