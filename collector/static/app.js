// exam-footage portal: plain JS, no build step, no CDN. zh-CN by default; times shown in Asia/Shanghai.
"use strict";

const TEXT = {
  zh: {
    title: "考试录像监管平台", batches: "批次列表", logout: "退出登录", login: "登录", username: "用户名",
    password: "密码", login_failed: "用户名或密码错误", login_throttled: "登录失败次数过多，请 {s} 秒后再试", batch: "批次", institution: "机构", occupation: "职业",
    level: "等级", venue: "场所", time: "考试时间（北京时间）", status: "状态", parts: "考场",
    complete: "完整", gaps: "有覆盖缺口", no_footage: "无录像", pending: "进行中/待上传",
    theory: "理论知识考场", practical: "操作技能考场", camera: "摄像头", covered: "覆盖率",
    legend_covered: "有录像", legend_gap: "覆盖缺口", legend_flagged: "画面异常（已标记）",
    gap_list: "覆盖缺口", no_gaps: "无覆盖缺口", no_camera: "该考场没有已知的摄像头",
    export: "导出证据包", export_title: "导出证据包", export_reason: "导出原因（必填，写入审计日志）",
    cancel: "取消", export_go: "导出", exporting: "正在导出……", export_done: "证据包已生成：",
    download: "下载证据包", export_failed: "导出失败：", filter: "筛选", all: "全部", date: "日期",
    none: "没有可查看的批次", player_hint: "点击时间轴，从该时刻开始播放录像",
    in_gap: "该时刻为覆盖缺口，没有录像", playing: "正在播放", seq: "序号", back: "返回批次列表",
    seconds: "秒", cause: "原因", language: "English",
    recorder_crashed: "录像进程崩溃", camera_unreachable: "摄像头不可达", corrupt_segment: "片段损坏",
    disk_full: "磁盘已满", agent_stopped: "采集端停止", missing_seq: "序号缺失", rejected_upload: "上传被拒收", deleted_by_retention: "保存期满已删除",
    clock_unsynced: "时钟未同步", clock_suspect: "时钟可疑", unknown: "原因不明", health_black: "黑屏", health_frozen: "画面冻结",
    health_obstructed: "镜头遮挡", no_camera_cause: "无摄像头", segments_unit: "个片段",
  },
  en: {
    title: "Exam footage portal", batches: "Batches", logout: "Log out", login: "Log in", username: "User name",
    password: "Password", login_failed: "Wrong user name or password",
    login_throttled: "Too many failed logins: try again in {s} s", batch: "Batch", institution: "Institution",
    occupation: "Occupation", level: "Level", venue: "Venue", time: "Exam time (Asia/Shanghai)", status: "Status",
    parts: "Parts", complete: "complete", gaps: "coverage gaps", no_footage: "no footage", pending: "pending",
    theory: "theory room", practical: "practical room", camera: "Camera", covered: "covered",
    legend_covered: "footage", legend_gap: "coverage gap", legend_flagged: "flagged video",
    gap_list: "Coverage gaps", no_gaps: "no coverage gaps", no_camera: "no known camera in this room",
    export: "Export evidence package", export_title: "Export evidence package",
    export_reason: "Reason (required, written to the audit log)", cancel: "Cancel", export_go: "Export",
    exporting: "Exporting…", export_done: "Evidence package ready: ", download: "Download package",
    export_failed: "Export failed: ", filter: "Filter", all: "all", date: "Date", none: "No batches to show",
    player_hint: "Click a timeline to play the footage from that moment",
    in_gap: "No footage at that moment (coverage gap)", playing: "Playing", seq: "seq", back: "Back to batches",
    seconds: "s", cause: "cause", language: "中文",
    recorder_crashed: "recorder crashed", camera_unreachable: "camera unreachable", corrupt_segment: "corrupt segment",
    disk_full: "disk full", agent_stopped: "agent stopped", missing_seq: "missing seq", rejected_upload: "upload rejected", deleted_by_retention: "deleted by retention",
    clock_unsynced: "clock not synced", clock_suspect: "clock suspect", unknown: "unknown", health_black: "black video", health_frozen: "frozen video",
    health_obstructed: "obstructed view", no_camera_cause: "no camera", segments_unit: "segments",
  },
};
const DISQUALIFYING = ["black", "frozen", "obstructed"];

let lang = localStorage.getItem("lang") || "zh";
let me = null;
let currentBatch = null;

const t = (key) => (TEXT[lang][key] !== undefined ? TEXT[lang][key] : key);
const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $("#view");

function esc(s) {
  return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// Asia/Shanghai is UTC+8 all year: format without relying on the browser's time zone data.
function local(iso, withDate = true) {
  const d = new Date(new Date(iso).getTime() + 8 * 3600 * 1000);
  const p = (n) => String(n).padStart(2, "0");
  const time = `${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())}`;
  return withDate ? `${d.getUTCFullYear()}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ${time}` : time;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401 && !path.endsWith("/login")) {
    me = null;
    location.hash = "#/login";
    throw new Error("401");
  }
  return response;
}

function applyStatic() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.title = t("title");
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("#lang").textContent = t("language");
  $("#who").textContent = me ? `${me.username} (${me.role})` : "";
  $("#logout").hidden = !me;
}

function badge(status) {
  return `<span class="badge ${esc(status)}" data-status="${esc(status)}">${esc(t(status))}</span>`;
}

// ---------------------------------------------------------------------------- pages

function showLogin(message = "") {
  view().innerHTML = `
    <form class="card login" id="login-form">
      <h2>${esc(t("login"))}</h2>
      <label for="username">${esc(t("username"))}</label><input id="username" autocomplete="username" required>
      <label for="password">${esc(t("password"))}</label>
      <input id="password" type="password" autocomplete="current-password" required>
      <p class="error" id="login-error">${esc(message)}</p>
      <button type="submit" id="login-submit">${esc(t("login"))}</button>
    </form>`;
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const response = await api("/api/login", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username: $("#username").value, password: $("#password").value }),
    });
    if (!response.ok) {
      $("#login-error").textContent = response.status === 429
        ? t("login_throttled").replace("{s}", response.headers.get("Retry-After") || "60") : t("login_failed");
      return;
    }
    me = (await response.json()).user;
    applyStatic();
    location.hash = "#/batches";
  });
}

async function showBatches() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const response = await api(`/api/batches?${params}`);
  const items = await response.json();
  const statuses = ["complete", "gaps", "no_footage", "pending"];
  const rows = items.map((b) => `
    <tr class="batch-row" data-batch="${esc(b.batch_id)}">
      <td>${esc(b.batch_id)}</td><td>${esc(b.institution)}</td><td>${esc(b.occupation)}</td><td>${esc(b.level)}</td>
      <td>${esc(b.venues.join(", "))}</td>
      <td>${b.start ? esc(local(b.start)) + " – " + esc(local(b.end, false)) : ""}</td>
      <td>${badge(b.status)}</td></tr>`).join("");
  view().innerHTML = `
    <div class="card">
      <form class="filters" id="filters">
        <label>${esc(t("institution"))}<input name="institution" value="${esc(params.get("institution") || "")}"></label>
        <label>${esc(t("venue"))}<input name="venue" value="${esc(params.get("venue") || "")}"></label>
        <label>${esc(t("date"))}<input type="date" name="date" value="${esc(params.get("date") || "")}"></label>
        <label>${esc(t("status"))}<select name="status"><option value="">${esc(t("all"))}</option>
          ${statuses.map((s) => `<option value="${s}" ${params.get("status") === s ? "selected" : ""}>${esc(t(s))}</option>`).join("")}
        </select></label>
        <button type="submit">${esc(t("filter"))}</button>
      </form>
      <table id="batch-table"><thead><tr><th>${esc(t("batch"))}</th><th>${esc(t("institution"))}</th>
        <th>${esc(t("occupation"))}</th><th>${esc(t("level"))}</th><th>${esc(t("venue"))}</th><th>${esc(t("time"))}</th>
        <th>${esc(t("status"))}</th></tr></thead><tbody>${rows || `<tr><td colspan="7">${esc(t("none"))}</td></tr>`}</tbody></table>
    </div>`;
  $("#filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    new FormData(ev.target).forEach((v, k) => { if (v) q.set(k, v); });
    location.hash = `#/batches?${q}`;
  });
  document.querySelectorAll("tr.batch-row").forEach((row) => row.addEventListener("click", () => {
    location.hash = `#/batch/${encodeURIComponent(row.dataset.batch)}`;
  }));
}

function causes(list) {
  return list.map((c) => t(c === "no_camera" ? "no_camera_cause" : c)).join(lang === "zh" ? "、" : ", ");
}

async function showBatch(batchId) {
  const response = await api(`/api/batches/${encodeURIComponent(batchId)}`);
  if (!response.ok) { view().innerHTML = `<div class="card error">${esc((await response.json()).detail)}</div>`; return; }
  const batch = await response.json();
  currentBatch = batch;
  const parts = batch.parts.map((part, pi) => {
    const w0 = Date.parse(part.start), w1 = Date.parse(part.end), span = w1 - w0;
    const pos = (iso) => Math.max(0, Math.min(100, ((Date.parse(iso) - w0) / span) * 100));
    const cams = part.cameras.map((cam, ci) => {
      const segs = cam.segments.map((s) => {
        const flagged = s.health.some((h) => DISQUALIFYING.includes(h));
        const left = pos(s.start), width = Math.max(0, pos(s.end) - left);
        return width > 0 ? `<div class="${flagged ? "flagged" : "covered"}" data-left="${left}" data-width="${width}"
          title="${esc(t("seq"))} ${s.seq}${flagged ? " · " + esc(causes(s.health.map((h) => "health_" + h))) : ""}"></div>` : "";
      }).join("");
      const gaps = cam.gaps.map((g) => {
        const left = pos(g.start), width = Math.max(0.4, pos(g.end) - left);
        const health = g.causes.every((c) => c.startsWith("health_"));
        return `<div class="gap${health ? " health" : ""}" data-testid="gap" data-left="${left}" data-width="${width}"
          title="${esc(local(g.start))} – ${esc(local(g.end, false))} ${esc(causes(g.causes))}"></div>`;
      }).join("");
      const gapList = cam.gaps.length ? `<ul class="gaplist">${cam.gaps.map((g) =>
        `<li>${esc(local(g.start))} – ${esc(local(g.end, false))}（${g.seconds} ${esc(t("seconds"))}）${esc(t("cause"))}：${esc(causes(g.causes))}</li>`).join("")}</ul>`
        : `<p class="gaplist none">${esc(t("no_gaps"))}</p>`;
      return `<div class="camera" data-camera="${esc(cam.camera)}">
        <div class="camera-head"><span>${esc(t("camera"))} <b>${esc(cam.camera)}</b></span>
          <span>${esc(t("covered"))} ${cam.covered_percent.toFixed(1)}% ${badge(cam.status)}</span></div>
        <div class="timeline" data-part="${pi}" data-cam="${ci}">${segs}${gaps}<div class="playhead" hidden></div></div>
        <div class="axis"><span>${esc(local(part.start, false))}</span><span>${esc(local(part.end, false))}</span></div>
        ${gapList}</div>`;
    }).join("");
    return `<div class="card part">
      <h3>${esc(t(part.part))} ${esc(part.room)} · ${esc(t("venue"))} ${esc(part.venue)} ·
        ${esc(local(part.start))} – ${esc(local(part.end, false))} ${badge(part.status)}</h3>
      ${cams || `<p>${esc(t("no_camera"))}</p>`}</div>`;
  }).join("");
  view().innerHTML = `
    <div class="card toolbar">
      <div><h2>${esc(t("batch"))} ${esc(batch.batch_id)} ${badge(batch.status)}</h2>
        <div>${esc(t("institution"))} ${esc(batch.institution)} · ${esc(t("occupation"))} ${esc(batch.occupation)} ·
          ${esc(t("level"))} ${esc(batch.level)}</div></div>
      <div><button id="export-button" type="button">${esc(t("export"))}</button></div>
    </div>
    <div id="export-result" class="card" hidden></div>
    <div class="card legend"><span><i class="covered"></i>${esc(t("legend_covered"))}</span>
      <span><i class="gap"></i>${esc(t("legend_gap"))}</span>
      <span><i class="flagged"></i>${esc(t("legend_flagged"))}</span></div>
    ${parts}
    <div class="card"><div id="player-info">${esc(t("player_hint"))}</div>
      <video id="player" controls muted playsinline preload="metadata"></video></div>`;
  // Positions are set through the DOM: the Content-Security-Policy refuses style="..." in markup.
  document.querySelectorAll(".timeline [data-left]").forEach((el) => {
    el.style.left = `${el.dataset.left}%`;
    el.style.width = `${el.dataset.width}%`;
  });
  document.querySelectorAll(".timeline").forEach((bar) => bar.addEventListener("click", (ev) => {
    const rect = bar.getBoundingClientRect();
    const frac = Math.max(0, Math.min(1, (ev.clientX - rect.left) / rect.width));
    const part = batch.parts[Number(bar.dataset.part)];
    const cam = part.cameras[Number(bar.dataset.cam)];
    const w0 = Date.parse(part.start), w1 = Date.parse(part.end);
    playAt(cam, w0 + frac * (w1 - w0), bar);
  }));
  $("#export-button").addEventListener("click", () => {
    $("#export-reason").value = "";
    $("#dialog").hidden = false;
    $("#export-reason").focus();
  });
}

// ---------------------------------------------------------------------------- playback

let playing = null;   // {cam, index, bar}

function playSegment(cam, index, offsetSeconds, bar) {
  const seg = cam.segments[index];
  const video = $("#player");
  playing = { cam, index, bar };
  video.src = `/api/segments/${seg.id}/video`;
  video.dataset.segment = String(seg.id);
  $("#player-info").textContent = `${t("playing")}: ${t("camera")} ${cam.camera} · ${t("seq")} ${seg.seq} · ${local(seg.start)}`;
  video.addEventListener("loadedmetadata", () => {
    video.currentTime = Math.max(0, Math.min(offsetSeconds, (video.duration || 0) - 0.05));
    video.play().catch(() => {});
  }, { once: true });
}

function playAt(cam, ms, bar) {
  const index = cam.segments.findIndex((s) => s.playable && Date.parse(s.start) <= ms && ms < Date.parse(s.end));
  if (index < 0) {
    $("#player-info").textContent = `${t("in_gap")} (${local(new Date(ms).toISOString())})`;
    return;
  }
  playSegment(cam, index, (ms - Date.parse(cam.segments[index].start)) / 1000, bar);
}

function onTimeUpdate() {
  const video = $("#player");
  if (!playing || !currentBatch) return;
  const seg = playing.cam.segments[playing.index];
  const part = currentBatch.parts[Number(playing.bar.dataset.part)];
  const w0 = Date.parse(part.start), w1 = Date.parse(part.end);
  const now = Date.parse(seg.start) + video.currentTime * 1000;
  const head = playing.bar.querySelector(".playhead");
  head.hidden = false;
  head.style.left = `${Math.max(0, Math.min(100, ((now - w0) / (w1 - w0)) * 100))}%`;
}

function onEnded() {
  if (!playing) return;
  const { cam, index, bar } = playing;
  const next = cam.segments[index + 1];
  // Continue only into footage that follows without a gap; a gap is never skipped silently.
  if (next && next.playable && Math.abs(Date.parse(next.start) - Date.parse(cam.segments[index].end)) < 2000) {
    playSegment(cam, index + 1, 0, bar);
  } else if (next) {
    $("#player-info").textContent = `${t("in_gap")}: ${local(cam.segments[index].end)} – ${local(next.start, false)}`;
  }
}

// ---------------------------------------------------------------------------- export

async function submitExport(ev) {
  ev.preventDefault();
  const reason = $("#export-reason").value.trim();
  if (!reason || !currentBatch) return;
  $("#dialog").hidden = true;
  const box = $("#export-result");
  box.hidden = false;
  box.textContent = t("exporting");
  const response = await api(`/api/batches/${encodeURIComponent(currentBatch.batch_id)}/exports`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reason }),
  });
  const body = await response.json();
  if (!response.ok) { box.textContent = t("export_failed") + (body.detail || response.status); return; }
  box.innerHTML = `${esc(t("export_done"))} ${body.segments} ${esc(t("segments_unit"))} ·
    ${(body.bytes / 1e6).toFixed(1)} MB · ${esc(t("legend_gap"))} ${body.gaps} ·
    <a id="export-download" href="${esc(body.download)}">${esc(t("download"))}</a>`;
}

// ---------------------------------------------------------------------------- routing

async function route() {
  const hash = location.hash || "#/batches";
  try {
    if (!me && hash !== "#/login") {
      const response = await fetch("/api/me", { credentials: "same-origin" });
      if (response.ok) me = await response.json();
      else { location.hash = "#/login"; return; }
    }
    applyStatic();
    if (hash === "#/login") showLogin();
    else if (hash.startsWith("#/batch/")) await showBatch(decodeURIComponent(hash.slice(8)));
    else await showBatches();
  } catch (err) {
    if (err.message !== "401") throw err;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#lang").addEventListener("click", () => {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem("lang", lang);
    route();
  });
  $("#logout").addEventListener("click", async () => {
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
    me = null;
    location.hash = "#/login";
  });
  $("#export-form").addEventListener("submit", submitExport);
  $("#export-cancel").addEventListener("click", () => { $("#dialog").hidden = true; });
  document.addEventListener("timeupdate", onTimeUpdate, true);
  document.addEventListener("ended", onEnded, true);
  window.addEventListener("hashchange", route);
  applyStatic();
  route();
});
