// The console's building blocks: elements made from data (text only, never HTML), the alert and
// status lines, the confirmation dialog and the secret shown once.
import { ApiError } from './api.js';

const $ = (id) => document.getElementById(id);

/** An element: props set attributes (booleans and `on…` handlers as properties), children as text or nodes. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, '');
    else if (key === 'value' || key === 'checked') el[key] = value;
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  append(el, children);
  return el;
}

// ---- messages -------------------------------------------------------------------------------------

export function showError(err) {
  const box = $('alert');
  box.textContent = '';
  if (err instanceof ApiError) {
    append(box, [h('strong', {}, messageTitle(err)), ' ', err.message, err.code ? h('span', { class: 'note' }, ` [${err.code}]`) : null]);
    // A validation error names each field and what is wrong with it.
    if (Array.isArray(err.details) && err.details.length > 0) {
      box.appendChild(h('ul', { class: 'problems' }, err.details.map((d) => h('li', {}, d && d.field ? `${d.field}: ${d.message}` : JSON.stringify(d)))));
    }
  } else {
    append(box, [h('strong', {}, 'Error:'), ' ', err && err.message ? err.message : String(err)]);
  }
  box.hidden = false;
  box.scrollIntoView({ block: 'nearest' });
}

function messageTitle(err) {
  if (err.status === 401) return 'Not signed in.';
  if (err.code === 'INSUFFICIENT_SCOPE') return 'Not allowed for you.';
  if (err.status === 403) return 'Refused.';
  if (err.status === 404) return 'Not found.';
  if (err.status === 409) return 'Conflict.';
  if (err.status === 429) return 'Too many requests.';
  return 'Error:';
}

export function clearError() {
  const box = $('alert');
  box.hidden = true;
  box.textContent = '';
}

export function say(message) {
  $('status').textContent = message;
}

/** Runs an action from a button: busy while it runs, errors to the alert. Resolves to the action's result or undefined. */
export async function act(button, action) {
  clearError();
  if (button) {
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
  }
  try {
    return await action();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (button && button.isConnected) {
      button.disabled = false;
      button.removeAttribute('aria-busy');
    }
  }
}

// ---- what the person may not do ------------------------------------------------------------------

/** A note in place of controls the person's scopes do not allow. */
export const lacks = (scope, what) => h('p', { class: 'note lacks' }, `You cannot ${what}: your sign-in does not hold ${scope}.`);

// ---- formatting -----------------------------------------------------------------------------------

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

/** A <time> for an ISO date-time, or `never` when there is none. */
export function time(iso, never = '') {
  if (!iso) return never;
  const d = new Date(iso);
  return h('time', { datetime: iso, title: iso }, Number.isNaN(d.getTime()) ? iso : dateTime.format(d));
}

export const badge = (status) => h('span', { class: `badge badge-${status}` }, status);

export const numberText = (n) => (typeof n === 'number' ? n.toLocaleString() : '');

/** A table that turns into labelled cards on a phone (the /sso/ page's `.keys` table). */
export function table(caption, columns, rows) {
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'keys' },
      h('caption', { class: 'visually-hidden' }, caption),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.label ? c.label : h('span', { class: 'visually-hidden' }, c.hidden))))),
      h('tbody', {}, rows),
    ),
  );
}

/** A table cell labelled for the phone layout. */
export const cell = (label, cls, ...content) => h('td', { 'data-label': label || undefined, class: cls }, ...content);

// ---- confirmation ---------------------------------------------------------------------------------

/** Resolves true when the person confirms. `extra` (a node) goes between the text and the buttons. */
export function confirmAction(title, text, okLabel, extra) {
  const dialog = $('confirm-dialog');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  const slot = $('confirm-extra');
  slot.textContent = '';
  if (extra) slot.appendChild(extra);
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
    $('confirm-cancel').focus();
  });
}

// ---- the secret, shown once -----------------------------------------------------------------------

export function showSecret(minted, what) {
  $('secret-for').textContent = `${what} (${minted.masked}).`;
  const value = $('secret-value');
  value.value = minted.token;
  $('copy-result').textContent = '';
  const panel = $('secret-panel');
  panel.hidden = false;
  panel.scrollIntoView({ block: 'start' });
  value.focus();
  value.select();
}

export function hideSecret() {
  $('secret-value').value = '';
  $('secret-panel').hidden = true;
  $('copy-result').textContent = '';
}

function copySecret() {
  const value = $('secret-value');
  const fallback = 'Could not copy automatically. The key is selected: press Ctrl+C (\u2318C on a Mac) to copy it.';
  const selectIt = () => {
    value.focus();
    value.select();
    $('copy-result').textContent = fallback;
  };
  if (!value.value) return;
  if (!navigator.clipboard || !navigator.clipboard.writeText) return selectIt();
  navigator.clipboard.writeText(value.value).then(() => ($('copy-result').textContent = 'Copied to the clipboard.'), selectIt);
}

export function wireSecretPanel() {
  $('copy-secret').addEventListener('click', copySecret);
  $('dismiss-secret').addEventListener('click', hideSecret);
  $('secret-value').addEventListener('focus', (e) => e.target.select());
}

// ---- forms ----------------------------------------------------------------------------------------

let fieldIds = 0;
/** A labelled control (an input, a select or a textarea), with its hint tied to it. */
export function field(label, input, hint) {
  const id = input.id || `f${++fieldIds}`;
  input.id = id;
  const hintEl = hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, hintEl);
}

/** Checkboxes for a list of values, inside a fieldset with a legend. */
export function checkboxes(legend, name, values, checked = []) {
  return h(
    'fieldset',
    { class: 'field' },
    h('legend', {}, legend),
    h('div', { class: 'choices' }, values.map((v) => h('label', { class: 'choice' }, h('input', { type: 'checkbox', name, value: v, checked: checked.includes(v) }), ` ${v}`))),
  );
}

export const checkedValues = (form, name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);

/** A datetime-local input's value as an ISO date-time (the browser's time zone), or undefined. */
export function isoFromLocal(value) {
  if (!value) return undefined;
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

/** An ISO date-time as a datetime-local value. */
export function localFromIso(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Addresses typed one per line (or separated by commas) as the API's allowlist: null for none. */
export function allowlistFrom(text) {
  const list = text.split(/[\s,]+/).filter((s) => s !== '');
  return list.length === 0 ? null : list;
}
