// keyward's self-service page. Plain script, no dependencies; served under a CSP with
// script-src 'self', so nothing here is inline and every piece of data goes in through textContent.
(function () {
  'use strict';

  // The API lives beside this script (/sso/app.js -> /sso/me, /sso/tokens), whatever the page URL.
  var API = new URL('./', document.currentScript ? document.currentScript.src : window.location.href);
  var NOT_SIGNED_IN = 'You are not signed in through the sign-in proxy. Sign in again, or open this page through your organisation\u2019s sign-in address.';

  var $ = function (id) { return document.getElementById(id); };
  var els = {};
  var state = { allowedScopes: [], keys: [] };

  function ApiError(status, code, message) {
    this.status = status;
    this.code = code;
    this.message = message;
  }

  // fetch with the proxy's cookie, the CSRF header on changes and the error envelope unwrapped.
  function api(method, path, body) {
    var headers = { Accept: 'application/json' };
    var init = { method: method, credentials: 'same-origin', headers: headers, cache: 'no-store' };
    if (method !== 'GET' && method !== 'HEAD') headers['X-Keyward-CSRF'] = '1';
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    return fetch(new URL(path, API), init).then(
      function (res) {
        if (res.status === 204) return null;
        return res.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (res.ok) return data;
          var err = data && data.error ? data.error : {};
          var message = typeof err.message === 'string' ? err.message : 'The server answered ' + res.status + ' ' + res.statusText + '.';
          throw new ApiError(res.status, typeof err.code === 'string' ? err.code : 'HTTP_' + res.status, message);
        });
      },
      function () {
        throw new ApiError(0, 'NETWORK_ERROR', 'Could not reach keyward. Check your connection and try again.');
      }
    );
  }

  function showError(err) {
    var box = els.alert;
    box.textContent = '';
    var strong = document.createElement('strong');
    var text = document.createElement('span');
    if (err instanceof ApiError && err.status === 401) {
      strong.textContent = NOT_SIGNED_IN;
      text.textContent = err.message ? ' (' + err.message + ')' : '';
    } else if (err instanceof ApiError) {
      strong.textContent = 'Error: ';
      text.textContent = err.message + (err.code ? ' [' + err.code + ']' : '');
    } else {
      strong.textContent = 'Error: ';
      text.textContent = err && err.message ? err.message : String(err);
    }
    box.appendChild(strong);
    box.appendChild(text);
    box.hidden = false;
  }

  function clearError() {
    els.alert.hidden = true;
    els.alert.textContent = '';
  }

  function say(message) {
    els.status.textContent = message;
  }

  var dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

  function timeCell(cell, iso, never) {
    cell.textContent = '';
    if (!iso) {
      cell.textContent = never;
      return;
    }
    var t = document.createElement('time');
    t.dateTime = iso;
    var d = new Date(iso);
    t.textContent = isNaN(d.getTime()) ? iso : dateFormat.format(d);
    t.title = iso;
    cell.appendChild(t);
  }

  function keyLabel(key) {
    return key.name ? '\u201c' + key.name + '\u201d' : 'key ' + key.masked;
  }

  // ---- who is signed in ----------------------------------------------------------------------

  function renderMe(me) {
    var who = els.who;
    who.textContent = 'Signed in as ';
    var strong = document.createElement('strong');
    strong.className = 'who-email';
    strong.textContent = me.identity.email;
    who.appendChild(strong);
    if (me.identity.username && me.identity.username !== me.identity.email) {
      who.appendChild(document.createTextNode(' (' + me.identity.username + ')'));
    }
    state.allowedScopes = Array.isArray(me.allowed_scopes) ? me.allowed_scopes : [];
    var box = els.scopeChoices;
    box.textContent = '';
    state.allowedScopes.forEach(function (scope, i) {
      var label = document.createElement('label');
      label.className = 'choice';
      var input = document.createElement('input');
      input.type = 'checkbox';
      input.name = 'scopes';
      input.value = scope;
      input.id = 'scope-' + i;
      input.checked = i === 0;
      label.appendChild(input);
      label.appendChild(document.createTextNode(' ' + scope));
      box.appendChild(label);
    });
  }

  // ---- the list -------------------------------------------------------------------------------

  function loadKeys() {
    var all = [];
    function page(cursor, n) {
      var path = 'tokens?limit=100' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : '');
      return api('GET', path).then(function (list) {
        all = all.concat(list.data || []);
        var next = list.meta && list.meta.next_cursor;
        return next && n < 50 ? page(next, n + 1) : all;
      });
    }
    return page(null, 0).then(function (keys) {
      state.keys = keys;
      renderKeys();
    });
  }

  function renderKeys() {
    var body = els.keysBody;
    body.textContent = '';
    // Newest first, and keys that still work before revoked or expired ones.
    var keys = state.keys.slice().sort(function (a, b) {
      var live = (a.status === 'active' ? 0 : 1) - (b.status === 'active' ? 0 : 1);
      return live !== 0 ? live : b.id - a.id;
    });
    keys.forEach(function (key) {
      var row = els.rowTemplate.content.firstElementChild.cloneNode(true);
      row.dataset.tokenId = String(key.id);
      row.querySelector('.c-name').textContent = key.name || '(unnamed)';
      if (!key.name) row.querySelector('.c-name').classList.add('muted');
      row.querySelector('.c-masked code').textContent = key.masked;
      row.querySelector('.c-scopes').textContent = (key.scopes || []).join(', ');
      row.querySelector('.c-env').textContent = key.environment;
      var badge = row.querySelector('.badge');
      badge.textContent = key.status;
      badge.classList.add('badge-' + key.status);
      timeCell(row.querySelector('.c-created'), key.created_at, '');
      timeCell(row.querySelector('.c-used'), key.last_used_at, 'Never');
      timeCell(row.querySelector('.c-expires'), key.status === 'revoked' ? key.revoked_at : key.expires_at, 'Never');
      if (key.status === 'revoked') row.querySelector('.c-expires').prepend(document.createTextNode('Revoked '));
      var rotate = row.querySelector('.rotate');
      var revoke = row.querySelector('.revoke');
      var label = key.name || key.masked;
      rotate.setAttribute('aria-label', 'Rotate ' + label);
      revoke.setAttribute('aria-label', 'Revoke ' + label);
      if (key.rotated_to !== null && key.rotated_to !== undefined && key.status === 'active') {
        // Already replaced: it works until its grace period ends, and cannot be rotated again.
        var note = document.createElement('span');
        note.className = 'note';
        note.textContent = ' replaced';
        row.querySelector('.c-status').appendChild(note);
        rotate.remove();
      }
      if (key.status !== 'active') {
        rotate.remove();
        revoke.remove();
      } else {
        rotate.addEventListener('click', function () { rotateKey(key, rotate); });
        revoke.addEventListener('click', function () { revokeKey(key, revoke); });
      }
      body.appendChild(row);
    });
    els.keysTable.hidden = keys.length === 0;
    els.keysEmpty.hidden = keys.length !== 0;
  }

  // ---- the secret, shown once -------------------------------------------------------------------

  function showSecret(minted, what) {
    els.secretFor.textContent = what + ' ' + keyLabel(minted) + ' (' + minted.masked + ').';
    els.secretValue.value = minted.token;
    els.copyResult.textContent = '';
    els.secretPanel.hidden = false;
    els.secretPanel.scrollIntoView({ block: 'start' });
    els.secretValue.focus();
    els.secretValue.select();
  }

  function hideSecret() {
    els.secretValue.value = '';
    els.secretPanel.hidden = true;
    els.copyResult.textContent = '';
  }

  function selectSecret(note) {
    els.secretValue.focus();
    els.secretValue.select();
    els.copyResult.textContent = note;
  }

  function copySecret() {
    var value = els.secretValue.value;
    if (!value) return;
    var fallback = 'Could not copy automatically. The key is selected: press Ctrl+C (\u2318C on a Mac) to copy it.';
    if (!navigator.clipboard || !navigator.clipboard.writeText) {
      selectSecret(fallback);
      return;
    }
    navigator.clipboard.writeText(value).then(
      function () { els.copyResult.textContent = 'Copied to the clipboard.'; },
      function () { selectSecret(fallback); }
    );
  }

  // ---- confirmation -----------------------------------------------------------------------------

  // Resolves true when the person confirms. A <dialog> where the browser has one, window.confirm otherwise.
  function confirmAction(title, text, okLabel) {
    var dialog = els.dialog;
    if (!dialog || typeof dialog.showModal !== 'function') {
      return Promise.resolve(window.confirm(title + '\n\n' + text));
    }
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = okLabel;
    dialog.returnValue = '';
    return new Promise(function (resolve) {
      dialog.addEventListener('close', function onClose() {
        dialog.removeEventListener('close', onClose);
        resolve(dialog.returnValue === 'ok');
      });
      dialog.showModal();
      $('confirm-cancel').focus();
    });
  }

  function busy(button, on) {
    button.disabled = on;
    if (on) button.setAttribute('aria-busy', 'true');
    else button.removeAttribute('aria-busy');
  }

  // ---- actions ----------------------------------------------------------------------------------

  function createKey(event) {
    event.preventDefault();
    clearError();
    var form = els.form;
    var scopes = Array.prototype.map.call(form.querySelectorAll('input[name="scopes"]:checked'), function (i) { return i.value; });
    if (scopes.length === 0) {
      showError(new Error('Pick at least one scope for the key.'));
      return;
    }
    var body = { scopes: scopes };
    var name = els.name.value.trim();
    if (name) body.name = name;
    var expiry = form.querySelector('input[name="expiry"]:checked');
    if (expiry && expiry.value !== 'never') body.expires_in = Number(expiry.value);
    var button = $('create-key');
    busy(button, true);
    api('POST', 'tokens', body)
      .then(function (minted) {
        form.reset();
        renderScopeDefaults();
        showSecret(minted, 'Your new key');
        say('Key ' + keyLabel(minted) + ' created.');
        return loadKeys();
      })
      .catch(showError)
      .then(function () { busy(button, false); });
  }

  function renderScopeDefaults() {
    var boxes = els.scopeChoices.querySelectorAll('input[name="scopes"]');
    Array.prototype.forEach.call(boxes, function (b, i) { b.checked = i === 0; });
  }

  function rotateKey(key, button) {
    clearError();
    confirmAction(
      'Rotate ' + keyLabel(key) + '?',
      'You get a new key with the same name, scopes and lifetime. The old key keeps working for one more day, so you can switch over; then it stops.',
      'Rotate'
    ).then(function (ok) {
      if (!ok) return;
      busy(button, true);
      return api('POST', 'tokens/' + encodeURIComponent(key.id) + '/rotate', {})
        .then(function (minted) {
          showSecret(minted, 'The new key replacing');
          say('Key ' + keyLabel(key) + ' rotated.');
          return loadKeys();
        })
        .catch(function (err) {
          busy(button, false);
          showError(err);
        });
    });
  }

  function revokeKey(key, button) {
    clearError();
    confirmAction(
      'Revoke ' + keyLabel(key) + '?',
      'The key (' + key.masked + ') stops working immediately. This cannot be undone.',
      'Revoke'
    ).then(function (ok) {
      if (!ok) return;
      busy(button, true);
      return api('DELETE', 'tokens/' + encodeURIComponent(key.id))
        .then(function () {
          say('Key ' + keyLabel(key) + ' revoked.');
          return loadKeys();
        })
        .catch(function (err) {
          busy(button, false);
          showError(err);
        });
    });
  }

  function refresh() {
    clearError();
    return loadKeys().catch(showError);
  }

  function start() {
    els = {
      alert: $('alert'),
      status: $('status'),
      who: $('who'),
      scopeChoices: $('scope-choices'),
      form: $('new-key-form'),
      name: $('new-name'),
      keysTable: $('keys-table'),
      keysBody: $('keys-body'),
      keysEmpty: $('keys-empty'),
      rowTemplate: $('key-row'),
      secretPanel: $('secret-panel'),
      secretValue: $('secret-value'),
      secretFor: $('secret-for'),
      copyResult: $('copy-result'),
      dialog: $('confirm-dialog'),
    };
    els.form.addEventListener('submit', createKey);
    $('copy-secret').addEventListener('click', copySecret);
    $('dismiss-secret').addEventListener('click', hideSecret);
    $('refresh').addEventListener('click', refresh);
    els.secretValue.addEventListener('focus', function () { els.secretValue.select(); });

    api('GET', 'me')
      .then(function (me) {
        renderMe(me);
        document.body.classList.add('signed-in');
        return loadKeys();
      })
      .catch(function (err) {
        els.who.textContent = err instanceof ApiError && err.status === 401 ? 'Not signed in' : '';
        document.body.classList.add('signed-out');
        showError(err);
      })
      .then(function () { document.body.classList.add('ready'); });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
