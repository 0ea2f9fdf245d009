// Small DOM helpers shared by the page's modules (no framework: this stays readable as is).

/** h('div', {class: 'x', onclick: fn}, child, 'text', ...) -> HTMLElement. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const int = new Intl.NumberFormat('en-US');
export const fmtInt = (n) => int.format(n);

/** 83.25 -> "1:23.3" (frame times are read to the tenth). */
export function fmtTime(s) {
  const m = Math.floor(s / 60);
  const rest = s - 60 * m;
  return `${m}:${rest.toFixed(1).padStart(4, '0')}`;
}

export function fmtBytes(n) {
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** A labelled progress bar: set(fraction or null for indeterminate, text). */
export function progressBar(text = '') {
  const bar = h('div', { class: 'bar' });
  const label = h('span', { class: 'label' }, text);
  const el = h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100 },
    h('div', { class: 'track' }, bar), label);
  return {
    el,
    set(fraction, message) {
      const indeterminate = fraction === null || fraction === undefined;
      el.classList.toggle('indeterminate', indeterminate);
      bar.style.width = indeterminate ? '' : `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
      if (!indeterminate) el.setAttribute('aria-valuenow', Math.round(fraction * 100));
      if (message !== undefined) label.textContent = message;
    },
    finish(message) {
      this.set(1, message);
      el.classList.add('done');
    },
    fail(message) {
      el.classList.add('failed');
      if (message !== undefined) label.textContent = message;
    },
  };
}

/** A readable error block: the server's message first, its type/code after. */
export function errorBlock(err, prefix = '') {
  const detail = [err.type, err.code, err.status ? `HTTP ${err.status}` : null].filter(Boolean).join(' · ');
  return h('div', { class: 'error', role: 'alert' },
    h('strong', {}, prefix || 'Error'), ' ', err.message || String(err),
    detail ? h('span', { class: 'error-detail' }, detail) : null);
}
