// A video or an image attached to a chat: the upload (with progress) to /v1/files, the
// plan from /v1/video/plan (frames, tokens, fits or what would), and the strip of the
// frames the model reads, drawn here from the local file at the plan's timestamps.

import { errorBlock, fmtBytes, fmtInt, fmtTime, h, progressBar } from './ui.js';

const THUMB = 112; // canvas pixels per thumbnail (shown smaller: sharp on high-DPI screens)
const SEEK_NUDGE_S = 1e-3; // land inside the frame that starts at t, not on the previous one's edge

/** The frame-sampling options of the settings panel ({fps, max_frames}, unset ones left out). */
export function samplingFrom(settings) {
  const out = {};
  if (settings.fps !== null) out.fps = settings.fps;
  if (settings.max_frames !== null) out.max_frames = settings.max_frames;
  return out;
}

export class Attachment {
  /**
   * @param {File} file the dropped or chosen file.
   * @param {import('./api.js').Api} api
   * @param {{fps?: number, max_frames?: number}} sampling
   */
  constructor(file, api, sampling) {
    this.file = file;
    this.api = api;
    this.sampling = sampling;
    this.kind = file.type.startsWith('image/') ? 'image' : 'video'; // the plan says for sure
    this.url = URL.createObjectURL(file);
    this.fileId = null;
    this.plan = null;
    this.controller = new AbortController();
    this.uploadBar = progressBar('waiting to upload');
    this.planEl = h('div', { class: 'plan' });
    this.strip = h('div', { class: 'strip', 'aria-label': 'frames the model reads' });
    this.removeButton = h('button', { type: 'button', class: 'remove', title: 'Remove', 'aria-label': 'Remove attachment' }, '×');
    this.el = h('div', { class: 'media-card' },
      h('div', { class: 'media-head' },
        h('span', { class: 'media-name' }, file.name), h('span', { class: 'muted' }, fmtBytes(file.size)),
        this.removeButton),
      this.uploadBar.el, this.planEl, this.strip);
  }

  get ready() { return this.fileId !== null && this.plan !== null; }

  /** Upload, then plan; errors are shown on the card and rethrown. */
  async prepare(maxTokens) {
    try {
      const record = await this.api.upload(this.file, (loaded, total) => {
        this.uploadBar.set(total ? loaded / total : null, `uploading ${fmtBytes(loaded)} of ${fmtBytes(total)}`);
      }, this.controller.signal);
      this.fileId = record.id;
      this.uploadBar.finish(`uploaded · ${record.id}`);
    } catch (err) {
      if (err.name === 'AbortError') return;
      this.uploadBar.fail('upload failed');
      this.planEl.replaceChildren(errorBlock(err, 'Upload failed:'));
      throw err;
    }
    await this.replan(maxTokens);
  }

  /** Asks /v1/video/plan for the current sampling and shows the answer and the frames. */
  async replan(maxTokens) {
    if (this.fileId === null) return;
    this.planEl.replaceChildren(h('span', { class: 'muted' }, 'planning…'));
    try {
      const body = { file_id: this.fileId, ...this.sampling };
      if (maxTokens) body.max_tokens = maxTokens;
      this.plan = await this.api.json('v1/video/plan', { method: 'POST', body, signal: this.controller.signal });
    } catch (err) {
      if (err.name === 'AbortError') return;
      this.plan = null;
      this.planEl.replaceChildren(errorBlock(err, 'Cannot read this file:'));
      throw err;
    }
    this.kind = this.plan.kind;
    this.renderPlan();
    await this.drawFrames(this.kind === 'image' ? [0] : (this.plan.frame_timestamps || []), this.plan.cached);
  }

  renderPlan() {
    const p = this.plan;
    const what = p.kind === 'image' ? 'image'
      : `${p.duration_s !== null ? `${p.duration_s.toFixed(1)} s ` : ''}video`;
    const sampling = p.kind === 'image' ? '' : ` (${describeSampling(this.sampling)})`;
    const parts = [
      h('span', { class: 'plan-main' }, `${what} · ${fmtInt(p.frames)} frame${p.frames === 1 ? '' : 's'}${sampling} → `
        + `${fmtInt(p.vision_tokens)} vision tokens`),
      h('span', { class: 'muted' }, ` · prompt ${fmtInt(p.prompt_tokens)} + ${fmtInt(p.max_tokens)} new of `
        + `${fmtInt(p.context)} context${p.cached ? ' · codes cached' : ''}`),
    ];
    if (p.fits) {
      parts.push(h('span', { class: 'badge ok' }, 'fits'));
    } else {
      parts.push(h('span', { class: 'badge bad' }, 'too long'));
      if (p.suggested_max_frames) {
        const hint = `max_frames ${p.suggested_max_frames}${p.suggested_fps ? ` (≈ fps ${p.suggested_fps})` : ''}`;
        parts.push(h('button', {
          type: 'button', class: 'link', onclick: () => this.applySuggestion(),
        }, `use ${hint}`));
      } else {
        parts.push(h('span', { class: 'muted' }, ' even one frame does not fit: lower max tokens'));
      }
    }
    this.planEl.replaceChildren(...parts);
  }

  applySuggestion() {
    const p = this.plan;
    this.sampling = { ...this.sampling, max_frames: p.suggested_max_frames };
    if (this.sampling.fps !== undefined && p.suggested_fps) this.sampling.fps = p.suggested_fps;
    this.el.dispatchEvent(new CustomEvent('sampling-changed', { detail: this.sampling, bubbles: true }));
    this.replan(p.max_tokens).catch(() => {}); // shown on the card
  }

  /**
   * Draws the frames at `times` (seconds) as square thumbnails, center-cropped as the
   * model sees them. `exact`: the times are the decoded frames' own (cached or answered).
   */
  async drawFrames(times, exact) {
    const figures = times.map((t) => {
      const canvas = h('canvas', { width: THUMB, height: THUMB });
      const caption = this.kind === 'image' ? 'image' : `${exact ? '' : '≈'}${fmtTime(t)}`;
      return { t, canvas, el: h('figure', { class: 'frame' }, canvas, h('figcaption', {}, caption)) };
    });
    this.strip.replaceChildren(...figures.map((f) => f.el));
    this.strip.dataset.exact = exact ? 'true' : 'false';
    if (!figures.length) {
      this.strip.append(h('span', { class: 'muted' }, 'frame times are known once the video is read'));
      return;
    }
    try {
      if (this.kind === 'image') {
        const img = await loadImage(this.url);
        drawCover(figures[0].canvas, img, img.naturalWidth, img.naturalHeight);
      } else {
        await drawVideoFrames(this.url, figures);
      }
      this.strip.dataset.drawn = 'true';
    } catch {
      // A format this browser cannot play (the server may still read it): times only.
      this.strip.dataset.drawn = 'false';
      for (const f of figures) f.el.classList.add('no-preview');
    }
  }

  /** After the answer: the frames actually read (exact times); redraws if they differ. */
  async showAnswered(media) {
    const times = media.frames.map((f) => f.timestamp);
    const drawn = this.plan && this.plan.frame_timestamps;
    const same = drawn && drawn.length === times.length && drawn.every((t, i) => Math.abs(t - times[i]) < 1e-3);
    if (this.kind === 'image') return;
    if (same) {
      this.strip.dataset.exact = 'true';
      this.strip.querySelectorAll('figcaption').forEach((c, i) => { c.textContent = fmtTime(times[i]); });
    } else {
      await this.drawFrames(times, true);
    }
  }

  /** The chat content part naming this file (follow-ups reuse the same sampling: codes are cached). */
  chatPart() {
    const type = this.kind === 'image' ? 'image_url' : 'video_url';
    const opts = this.kind === 'image' ? {} : this.sampling;
    return { type, [type]: { url: this.fileId, ...opts } };
  }

  /**
   * Stops a running upload or plan and forgets the local preview. `forget`: also deletes
   * the uploaded file (an attachment removed before it was asked about was only for this).
   */
  discard({ forget = false } = {}) {
    this.controller.abort();
    URL.revokeObjectURL(this.url);
    if (forget && this.fileId !== null) {
      this.api.json(`v1/files/${encodeURIComponent(this.fileId)}`, { method: 'DELETE' })
        .catch(() => {}); // already gone, or the server is away: nothing to show
    }
  }
}

function describeSampling(s) {
  const parts = [];
  if (s.fps !== undefined) parts.push(`fps ${s.fps}`);
  if (s.max_frames !== undefined) parts.push(`max ${s.max_frames}`);
  return parts.join(', ') || 'default';
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('cannot show this image'));
    img.src = url;
  });
}

/** Draws `source` into the square canvas: scale the shorter side, center crop (LWM's preprocessing). */
function drawCover(canvas, source, w, hgt) {
  const side = Math.min(w, hgt);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(source, (w - side) / 2, (hgt - side) / 2, side, side, 0, 0, canvas.width, canvas.height);
}

async function drawVideoFrames(url, figures) {
  const video = h('video', { muted: true, preload: 'auto', playsinline: true });
  video.src = url;
  await once(video, 'loadeddata');
  for (const f of figures) {
    const target = Math.min(f.t + SEEK_NUDGE_S, Math.max(video.duration - SEEK_NUDGE_S, 0));
    if (Math.abs(video.currentTime - target) > 1e-6) {
      video.currentTime = target;
      await once(video, 'seeked');
    }
    await framePresented(video);
    drawCover(f.canvas, video, video.videoWidth, video.videoHeight);
    f.el.classList.add('drawn');
  }
  video.removeAttribute('src');
  video.load();
}

/** After a seek, 'seeked' can fire before the new frame is decoded on a busy machine (a black
 * thumbnail): wait for the frame itself where the browser says so, else a short while. */
function framePresented(video) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 300);
    if (video.requestVideoFrameCallback) {
      video.requestVideoFrameCallback(() => { clearTimeout(timer); resolve(); });
    }
  });
}

function once(el, name) {
  return new Promise((resolve, reject) => {
    const ok = () => { el.removeEventListener('error', bad); resolve(); };
    const bad = () => { el.removeEventListener(name, ok); reject(new Error('cannot play this video here')); };
    el.addEventListener(name, ok, { once: true });
    el.addEventListener('error', bad, { once: true });
  });
}
