// The conversation: messages on screen and in the request history, streamed answers,
// the stop button (aborting the fetch closes the connection; the server aborts the
// request), usage and time to first token per answer, ingest progress for media.
//
// Which endpoint: a chat whose FIRST message carries a video or image (and no custom
// system prompt) asks POST /v1/video/questions (stream=true: named `progress` events,
// then answer chunks with the frames read). Everything else, follow-ups about that
// same video included, goes to POST /v1/chat/completions with the whole history;
// the video is sent again by file id with the same sampling, so its codes come from
// the server's cache (progress arrives there as SSE comments).

import { errorBlock, fmtInt, h, progressBar } from './ui.js';

const MIN_RATE_SPAN_S = 0.25;
const DEFAULT_QUESTION = { video: 'What is happening in this video?', image: 'What is in this image?' };

export class Thread {
  /**
   * @param {HTMLElement} el the message list.
   * @param {import('./api.js').Api} api
   * @param {() => object} settings reads the settings panel.
   */
  constructor(el, api, settings) {
    this.el = el;
    this.api = api;
    this.settings = settings;
    this.history = []; // {role, text, attachment?}
    this.controller = null;
    this.model = null;
  }

  get busy() { return this.controller !== null; }

  reset() {
    this.stop();
    for (const m of this.history) if (m.attachment) m.attachment.discard();
    this.history = [];
    this.el.querySelectorAll('.msg').forEach((m) => m.remove());
  }

  /** Aborts the answer being streamed (no-op when idle). */
  stop() {
    if (this.controller) this.controller.abort();
  }

  /** Sends one user turn (text and an optional ready attachment) and streams the answer. */
  async ask(text, attachment = null) {
    const question = text || (attachment ? DEFAULT_QUESTION[attachment.kind] : '');
    const turn = { role: 'user', text: question, attachment };
    this.history.push(turn);
    this.append(h('article', { class: 'msg user' },
      attachment ? attachment.el : null, h('div', { class: 'text' }, question)));
    const view = new AnswerView();
    this.append(view.el);
    const s = this.settings();
    const viaVideoEndpoint = attachment && this.history.length === 1 && !s.system;
    this.controller = new AbortController();
    const started = performance.now();
    try {
      if (viaVideoEndpoint) await this.askVideo(turn, s, view);
      else await this.askChat(s, view);
      view.finish(started);
      this.history.push({ role: 'assistant', text: view.text });
    } catch (err) {
      if (err.name === 'AbortError') {
        view.stopped(started);
        if (view.text) this.history.push({ role: 'assistant', text: view.text });
        else this.history.pop();
      } else {
        view.failed(err);
        this.history.pop(); // the turn did not happen: a retry sends it again
      }
    } finally {
      this.controller = null;
    }
  }

  async askChat(s, view) {
    const messages = [];
    if (s.system) messages.push({ role: 'system', content: s.system });
    for (const m of this.history) {
      messages.push(m.attachment
        ? { role: m.role, content: [{ type: 'text', text: m.text }, m.attachment.chatPart()] }
        : { role: m.role, content: m.text });
    }
    const body = { messages, stream: true, stream_options: { include_usage: true }, ...sampling(s) };
    if (this.model) body.model = this.model;
    await this.api.stream('v1/chat/completions', { body, signal: this.controller.signal }, (ev) => {
      if (ev.comment !== undefined) { view.progress(parseComment(ev.comment)); return; }
      const chunk = ev.data;
      if (chunk.object === 'chat.completion') { // a JSON answer (not streamed)
        view.delta(chunk.choices[0].message.content || '');
        view.done(chunk.choices[0].finish_reason, chunk.usage);
        return;
      }
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) view.delta(c.delta.content);
        if (c.finish_reason) view.finishReason = c.finish_reason;
      }
      if (chunk.usage) view.done(view.finishReason, chunk.usage);
    });
  }

  async askVideo(turn, s, view) {
    const a = turn.attachment;
    const form = new FormData();
    form.append('question', turn.text);
    form.append('file_id', a.fileId);
    form.append('stream', 'true');
    for (const [k, v] of Object.entries({ ...sampling(s), ...a.sampling })) form.append(k, String(v));
    if (this.model) form.append('model', this.model);
    await this.api.stream('v1/video/questions', { form, signal: this.controller.signal }, (ev) => {
      if (ev.event === 'progress') { view.progress(ev.data); return; }
      const chunk = ev.data;
      if (chunk.object === 'video.answer') { // a JSON answer (not streamed)
        view.delta(chunk.answer);
        view.done(chunk.finish_reason, chunk.usage);
        a.showAnswered(chunk.media);
        return;
      }
      if (chunk.delta) view.delta(chunk.delta);
      if (chunk.finish_reason) {
        view.done(chunk.finish_reason, chunk.usage);
        if (chunk.media) a.showAnswered(chunk.media);
      }
    });
  }

  append(node) {
    this.el.append(node);
    node.scrollIntoView({ block: 'end', behavior: 'smooth' });
  }
}

/** The request's sampling fields (OpenAI names; unset ones left out). */
export function sampling(s) {
  const out = {};
  for (const k of ['temperature', 'top_p', 'top_k', 'max_tokens', 'seed']) if (s[k] !== null) out[k] = s[k];
  return out;
}

/** ": progress stage=decode item=0 done=3 total=8 frames_per_s=1.2" -> {stage, done, total, ...}. */
export function parseComment(text) {
  if (!text.startsWith('progress')) return null;
  const out = {};
  for (const [, k, v] of text.matchAll(/(\w+)=(\S+)/g)) out[k] = Number.isNaN(Number(v)) ? v : Number(v);
  if (out.stage === 'prefill' && out.prompt_tokens !== undefined) { out.done = 0; out.total = out.prompt_tokens; }
  return out;
}

const STAGES = {
  decode: (e) => `decoding frames ${e.done}/${e.total}`,
  encode: (e) => `VQGAN encoding ${e.done}/${e.total} frames${e.frames_per_s ? ` · ${e.frames_per_s} frames/s` : ''}`,
  cached: (e) => `frame codes from the cache (${e.total} frame${e.total === 1 ? '' : 's'})`,
};

/** One assistant answer on screen: progress, streamed text, then its usage line. */
class AnswerView {
  constructor() {
    this.text = '';
    this.textEl = h('div', { class: 'text streaming' });
    this.progressEl = h('div', { class: 'progress-area' });
    this.meta = h('footer', { class: 'meta' }, h('span', { class: 'muted' }, 'waiting for the model…'));
    this.el = h('article', { class: 'msg assistant' }, this.progressEl, this.textEl, this.meta);
    this.bars = {};
    this.firstTokenAt = null;
    this.lastTokenAt = null;
    this.ingestEndedAt = null; // media read (decode + VQGAN, or the cache): the prefill starts
    this.usage = null;
    this.finishReason = null;
    this.extra = null;
  }

  bar(name) {
    if (!this.bars[name]) {
      this.bars[name] = progressBar();
      this.progressEl.append(this.bars[name].el);
    }
    return this.bars[name];
  }

  progress(e) {
    if (!e) return;
    if (e.stage === 'prefill') {
      if (this.ingestEndedAt === null && this.bars.ingest) this.ingestEndedAt = performance.now();
      const bar = this.bar('prefill');
      if (e.done >= e.total && e.total > 0) bar.finish(`prefill ${fmtInt(e.total)} tokens${e.seconds !== undefined ? ` in ${e.seconds.toFixed(2)} s` : ''}`);
      else bar.set(null, `prefill ${fmtInt(e.total)} tokens…`);
      return;
    }
    const describe = STAGES[e.stage];
    if (!describe) return;
    const bar = this.bar('ingest');
    const fraction = e.total ? e.done / e.total : null;
    if (e.stage === 'cached' || (e.stage === 'encode' && e.done >= e.total)) bar.finish(describe(e));
    else bar.set(fraction, describe(e));
  }

  delta(text) {
    if (!text) return;
    if (this.firstTokenAt === null) {
      this.firstTokenAt = performance.now();
      const prefill = this.bars.prefill;
      if (prefill && !prefill.el.classList.contains('done')) prefill.finish(prefill.el.textContent.replace('…', ''));
    }
    this.lastTokenAt = performance.now();
    this.text += text;
    this.textEl.textContent = this.text;
  }

  done(reason, usage) {
    this.finishReason = reason || this.finishReason;
    if (usage) this.usage = usage;
  }

  summary(started) {
    const parts = [];
    const u = this.usage;
    if (u) {
      parts.push(`${fmtInt(u.prompt_tokens)} prompt + ${fmtInt(u.completion_tokens)} completion tokens`);
      if (u.vision_tokens) parts.push(`${fmtInt(u.frames)} frame${u.frames === 1 ? '' : 's'} = ${fmtInt(u.vision_tokens)} vision tokens`);
    }
    if (this.firstTokenAt !== null) {
      const ingest = this.ingestEndedAt !== null ? ` (media ${((this.ingestEndedAt - started) / 1000).toFixed(2)} s)` : '';
      parts.push(`TTFT ${((this.firstTokenAt - started) / 1000).toFixed(2)} s${ingest}`);
      // Decode speed only over a span long enough to mean something (chunks may arrive together).
      const secs = (this.lastTokenAt - this.firstTokenAt) / 1000;
      if (u && u.completion_tokens > 1 && secs >= MIN_RATE_SPAN_S) parts.push(`${((u.completion_tokens - 1) / secs).toFixed(1)} tok/s`);
    }
    return parts;
  }

  finish(started) {
    this.textEl.classList.remove('streaming');
    if (!this.text) this.textEl.append(h('span', { class: 'muted' }, '(empty answer)'));
    const parts = this.summary(started);
    if (this.finishReason) parts.push(`finish: ${this.finishReason}`);
    this.meta.replaceChildren(...parts.map((p) => h('span', {}, p)));
    this.el.dataset.state = 'done';
  }

  stopped(started) {
    this.textEl.classList.remove('streaming');
    const parts = this.summary(started);
    this.meta.replaceChildren(h('span', { class: 'badge warn' }, 'stopped'), ...parts.map((p) => h('span', {}, p)));
    for (const bar of Object.values(this.bars)) if (!bar.el.classList.contains('done')) bar.fail('stopped');
    this.el.dataset.state = 'stopped';
  }

  failed(err) {
    this.textEl.classList.remove('streaming');
    for (const bar of Object.values(this.bars)) if (!bar.el.classList.contains('done')) bar.fail('failed');
    this.meta.replaceChildren(errorBlock(err));
    this.el.dataset.state = 'error';
  }
}
