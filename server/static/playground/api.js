// The server's OpenAI-compatible API as the page uses it: the bearer key, OpenAI
// error bodies turned into readable errors, Server-Sent Events, uploads with progress.

const KEY_STORAGE = 'lwm-serve.playground.api-key';

/** An error with the server's own message (the OpenAI error body), or a network/HTTP one. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = null, code = null, param = null } = {}) {
    super(message);
    this.name = 'ApiError';
    Object.assign(this, { status, type, code, param });
  }
}

/** ApiError from an OpenAI error object (`{error: {message, type, param, code}}`). */
export function errorFromBody(body, status = 0) {
  const err = body && body.error;
  if (err && typeof err.message === 'string') {
    return new ApiError(err.message, { status, type: err.type, code: err.code, param: err.param });
  }
  return null;
}

async function errorFromResponse(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: say the status instead */ }
  return errorFromBody(body, resp.status)
    || new ApiError(`the server answered HTTP ${resp.status} ${resp.statusText}`.trim(), { status: resp.status });
}

export class Api {
  constructor() {
    this.key = localStorage.getItem(KEY_STORAGE) || '';
  }

  setKey(key) {
    this.key = key.trim();
    if (this.key) localStorage.setItem(KEY_STORAGE, this.key);
    else localStorage.removeItem(KEY_STORAGE);
  }

  headers(extra = {}) {
    const h = { ...extra };
    if (this.key) h.Authorization = `Bearer ${this.key}`;
    return h;
  }

  /** GET/POST JSON; throws ApiError with the server's message on a non-2xx answer. */
  async json(path, { method = 'GET', body, signal } = {}) {
    const init = { method, signal, headers: this.headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(path, init);
    if (!resp.ok) throw await errorFromResponse(resp);
    return resp.json();
  }

  /** A Blob (e.g. a generated video's content). */
  async blob(path, { signal } = {}) {
    const resp = await fetch(path, { headers: this.headers(), signal });
    if (!resp.ok) throw await errorFromResponse(resp);
    return resp.blob();
  }

  /**
   * POSTs JSON (`body`) or a FormData (`form`) and calls onEvent({event, data} | {comment})
   * for each SSE event until [DONE]. A JSON (non-stream) answer comes as one event.
   * Aborting `signal` closes the connection: the server sees the disconnect.
   */
  async stream(path, { body, form, signal }, onEvent) {
    const headers = this.headers(form ? {} : { 'Content-Type': 'application/json' });
    const resp = await fetch(path, { method: 'POST', headers, body: form || JSON.stringify(body), signal });
    if (!resp.ok) throw await errorFromResponse(resp);
    if (!(resp.headers.get('content-type') || '').startsWith('text/event-stream')) {
      onEvent({ event: 'message', data: await resp.json() });
      return;
    }
    await readEvents(resp.body, onEvent);
  }

  /** Uploads a file to /v1/files (purpose user_data) with progress(loaded, total); resolves the file object. */
  upload(file, onProgress, signal) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest(); // fetch cannot report upload progress
      xhr.open('POST', 'v1/files');
      for (const [k, v] of Object.entries(this.headers())) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch { /* reported below */ }
        if (xhr.status >= 200 && xhr.status < 300 && body) resolve(body);
        else reject(errorFromBody(body, xhr.status)
          || new ApiError(`upload failed: HTTP ${xhr.status}`, { status: xhr.status }));
      };
      xhr.onerror = () => reject(new ApiError('upload failed: the server could not be reached'));
      xhr.onabort = () => reject(new DOMException('upload cancelled', 'AbortError'));
      if (signal) signal.addEventListener('abort', () => xhr.abort(), { once: true });
      const form = new FormData();
      form.append('purpose', 'user_data');
      form.append('file', file, file.name);
      xhr.send(form);
    });
  }
}

/**
 * Reads an SSE body: `event:`/`data:` lines up to a blank line make one event,
 * `: text` lines are comments (the chat endpoint's ingest progress). A data event
 * holding an OpenAI error object (a stream that failed after it began) throws.
 */
export async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = 'message';
  let data = [];
  const dispatch = () => {
    if (!data.length) { event = 'message'; return false; }
    const text = data.join('\n');
    const name = event;
    data = [];
    event = 'message';
    if (text === '[DONE]') return true;
    let parsed;
    try { parsed = JSON.parse(text); } catch { throw new ApiError(`unreadable stream event: ${text.slice(0, 80)}`); }
    const err = errorFromBody(parsed);
    if (err) throw err;
    onEvent({ event: name, data: parsed });
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, '');
      buffer = buffer.slice(nl + 1);
      if (line === '') {
        if (dispatch()) { reader.cancel().catch(() => {}); return; }
      } else if (line.startsWith(':')) {
        onEvent({ comment: line.slice(1).trim() });
      } else if (line.startsWith('event:')) {
        event = line.slice(6).trim();
      } else if (line.startsWith('data:')) {
        data.push(line.slice(5).replace(/^ /, ''));
      }
    }
  }
  dispatch();
}
