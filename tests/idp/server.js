#!/usr/bin/env node
/*
 * A real OpenID Connect provider for Clawdbot's integration tests.
 *
 *   node tests/idp/server.js CONFIG.json [PORT]
 *
 * Listens on 127.0.0.1 only, over plain http, with the issuer
 * http://127.0.0.1:<port>.  PORT comes from the second argument, else the
 * IDP_PORT environment variable, else the config's "port", else 0 (a free port
 * picked by the kernel).  Once bound it prints exactly one line to stdout:
 *
 *   IdP listening on http://127.0.0.1:<port>
 *
 * Everything else (oidc-provider's warnings, request errors) goes to stderr.
 *
 * CONFIG.json (see tests/idp.py, which writes it):
 *
 *   {
 *     "clients": [{
 *       "client_id": "gateway",
 *       "client_secret": "...",
 *       "redirect_uris": ["http://127.0.0.1:8080/callback"],
 *       "post_logout_redirect_uris": ["http://127.0.0.1:8080/"],   // optional
 *       "token_endpoint_auth_method": "client_secret_basic"        // optional, the default
 *       ...any other client metadata oidc-provider accepts
 *     }],
 *     "users": [{
 *       "sub": "alice",            // or "accountId"; also the login name
 *       "email": "alice@example.test",
 *       "email_verified": true,    // optional, default true
 *       "name": "Alice Example",
 *       "preferred_username": "alice",  // optional, default: sub
 *       "groups": ["admins", "users"],
 *       "password": "..."          // optional: when set, the login form must send it
 *     }],
 *     "jwks": {"keys": [<private RSA JWKs>]},   // optional: default one fresh RS256 key
 *     "port": 0                                  // optional
 *   }
 *
 * What the provider does (oidc-provider 8.8.1, pinned in package.json):
 *   - authorization code flow only, PKCE required for every client, S256 only;
 *   - refresh tokens for every client that has the refresh_token grant type
 *     (which is the default here), without needing the offline_access scope;
 *   - RS256 ID tokens; the ID token carries the scope's claims too
 *     (conformIdTokenClaims: false), not only the userinfo endpoint;
 *   - scopes: openid -> sub; email -> email, email_verified;
 *     profile -> name, preferred_username, groups; groups -> groups;
 *   - RP-initiated logout at /session/end, revocation, introspection,
 *     discovery at /.well-known/openid-configuration;
 *   - login without a browser: see the /interaction routes below;
 *   - key rotation for tests: POST /__test__/rotate (see below);
 *   - changing a user for tests: POST /__test__/user (see below).
 */

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider from 'oidc-provider';
// Internal module of oidc-provider (the package has no "exports" map, so the
// path is importable).  Calling it again on a running provider rebuilds the
// signing keystore and the JWKS document: that is how /__test__/rotate works.
// It is tied to the exact version pinned in package.json.
import initializeKeystore from 'oidc-provider/lib/helpers/initialize_keystore.js';

const HOST = '127.0.0.1';

// ---------------------------------------------------------------------------
// Configuration

const [configPath, portArg] = process.argv.slice(2);
if (!configPath) {
  process.stderr.write('usage: node server.js CONFIG.json [PORT]\n');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const port = Number(portArg ?? process.env.IDP_PORT ?? config.port ?? 0);

// Users, by account id.  The login form accepts the account id or the email.
const users = new Map();
for (const user of config.users ?? []) {
  const accountId = user.sub ?? user.accountId;
  if (!accountId) throw new Error('every user needs a "sub" (or "accountId")');
  users.set(String(accountId), { ...user, sub: String(accountId) });
}

function findUser(login) {
  if (users.has(login)) return users.get(login);
  for (const user of users.values()) {
    if (user.email && user.email === login) return user;
  }
  return undefined;
}

// Clients: fill in the defaults the tests rely on.
const clients = (config.clients ?? []).map((client) => ({
  token_endpoint_auth_method: 'client_secret_basic',
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  ...client,
}));

// A fresh RS256 signing key, with a kid of its own.
function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig',
  };
}

// The current private key set.  The FIRST key is the one that signs (the
// keystore returns matching keys in order); the others stay published in the
// JWKS so tokens they signed still verify.
let signingKeys = config.jwks?.keys?.length ? [...config.jwks.keys] : [newSigningKey()];

// ---------------------------------------------------------------------------
// HTML for the login form, the logout confirmation and errors.  Deliberately
// tiny: the tests drive these pages with a plain HTTP client.

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>
${body}
</body></html>
`;
}

function loginPage(uid, clientId, error) {
  return page('Sign in', `${error ? `<p class="error">${escapeHtml(error)}</p>\n` : ''}\
<p>Signing in to ${escapeHtml(clientId)}</p>
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label>Username <input type="text" name="login" autofocus></label>
<label>Password <input type="password" name="password"></label>
<button type="submit">Sign in</button>
</form>`);
}

// ---------------------------------------------------------------------------
// The HTTP server is bound first: the issuer must name the real port, which is
// only known once bound when port 0 is asked for.

const server = http.createServer();

server.listen(port, HOST, () => {
  const issuer = `http://${HOST}:${server.address().port}`;
  const provider = makeProvider(issuer);
  const oidc = provider.callback();

  server.on('request', (req, res) => {
    handle(provider, oidc, req, res).catch((err) => {
      process.stderr.write(`idp: ${req.method} ${req.url}: ${err.stack || err}\n`);
      if (!res.headersSent) {
        sendText(res, 500, `internal error: ${err.message}\n`);
      } else {
        res.end();
      }
    });
  });

  process.stdout.write(`IdP listening on ${issuer}\n`);
});

// Stop cleanly on the signals the test helper sends.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}

function makeProvider(issuer) {
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: signingKeys },

    findAccount: async (ctx, sub) => {
      const user = users.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        // All claims the user has; oidc-provider keeps only those the granted
        // scopes (and the claims parameter) ask for.
        claims: async () => ({
          sub,
          email: user.email,
          email_verified: user.email_verified ?? true,
          name: user.name,
          preferred_username: user.preferred_username ?? sub,
          groups: user.groups ?? [],
        }),
      };
    },

    // Which claim comes with which scope.  "groups" comes with "profile" and
    // also has a scope of its own, so a client may ask for either.
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username', 'groups'],
      groups: ['groups'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],

    // The authorization code flow only.
    responseTypes: ['code'],

    // The ID token carries the scope claims even though an access token for
    // the userinfo endpoint is issued too.
    conformIdTokenClaims: false,

    // PKCE for every client, S256 only.
    pkce: { methods: ['S256'], required: () => true },

    // Refresh tokens for every client allowed the refresh_token grant,
    // without requiring the offline_access scope.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),

    // Plain-http cookies on loopback: signed (cookies.keys), never "secure"
    // (the provider only marks them secure when the request is https).
    cookies: {
      keys: [randomBytes(32).toString('hex')],
    },

    features: {
      devInteractions: { enabled: false }, // our own /interaction routes below
      claimsParameter: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        // The confirmation page: the provider's form (id op.logoutForm, with
        // its xsrf field) plus a submit button logout=yes.
        logoutSource: async (ctx, form) => {
          ctx.body = page('Sign out', `${form.replace('</form>', '<button type="submit" name="logout" value="yes">Sign out</button></form>')}`);
        },
        postLogoutSuccessSource: async (ctx) => {
          ctx.body = page('Signed out', '<p>You are signed out.</p>');
        },
      },
    },

    interactions: {
      url: async (ctx, interaction) => `/interaction/${interaction.uid}`,
    },

    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out)
        .map(([key, value]) => `<p><strong>${escapeHtml(key)}</strong>: <span class="${escapeHtml(key)}">${escapeHtml(value)}</span></p>`)
        .join('\n'));
    },
  });

  // Loopback tests: say on stderr why a request failed.
  for (const event of ['authorization.error', 'grant.error', 'end_session.error', 'userinfo.error', 'server_error']) {
    provider.on(event, (ctx, err) => {
      process.stderr.write(`idp: ${event}: ${err.name}: ${err.message}${err.error_description ? ` (${err.error_description})` : ''}\n`);
    });
  }

  return provider;
}

// ---------------------------------------------------------------------------
// Routing: the interaction pages and the test-only admin endpoints; the rest
// goes to oidc-provider.

async function handle(provider, oidc, req, res) {
  const url = new URL(req.url, 'http://idp.invalid');
  let match;

  if ((match = url.pathname.match(/^\/interaction\/([^/]+)$/)) && req.method === 'GET') {
    return showInteraction(provider, req, res, match[1]);
  }
  if ((match = url.pathname.match(/^\/interaction\/([^/]+)\/login$/)) && req.method === 'POST') {
    return submitLogin(provider, req, res, match[1]);
  }
  if ((match = url.pathname.match(/^\/interaction\/([^/]+)\/abort$/)) && req.method === 'GET') {
    return provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
  }
  if (url.pathname === '/__test__/rotate' && req.method === 'POST') {
    return rotate(provider, res, url.searchParams.get('drop_old') === '1');
  }
  if (url.pathname === '/__test__/user' && req.method === 'POST') {
    return changeUser(res, JSON.parse(await readBody(req)));
  }
  return oidc(req, res);
}

// GET /interaction/:uid: the login form.  Should the provider ask for consent
// on its own (say a later request of an existing session asks for more
// scopes), consent is granted at once, without a page.
async function showInteraction(provider, req, res, uid) {
  const details = await interactionOr400(provider, req, res, uid);
  if (!details) return undefined;

  if (details.prompt.name === 'consent') {
    const grantId = await grantRequested(provider, details, details.session.accountId);
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  return sendHtml(res, 200, loginPage(uid, details.params.client_id));
}

// POST /interaction/:uid/login with login=<account id or email>[&password=..]:
// logs the user in AND grants everything the client asked for (the requested
// scopes and claims), so no consent prompt follows.
async function submitLogin(provider, req, res, uid) {
  const details = await interactionOr400(provider, req, res, uid);
  if (!details) return undefined;

  const form = new URLSearchParams(await readBody(req));
  const user = findUser(form.get('login') ?? '');
  if (!user || (user.password !== undefined && user.password !== form.get('password'))) {
    return sendHtml(res, 401, loginPage(uid, details.params.client_id, 'Unknown user or wrong password'));
  }

  const grantId = await grantRequested(provider, details, user.sub);
  return provider.interactionFinished(req, res, {
    login: { accountId: user.sub },
    consent: { grantId },
  }, { mergeWithLastSubmission: false });
}

// A Grant (saved) holding what the authorization request asked for.
async function grantRequested(provider, details, accountId) {
  const { params, prompt } = details;
  let grant;
  if (details.grantId) grant = await provider.Grant.find(details.grantId);
  if (!grant || grant.accountId !== accountId) {
    grant = new provider.Grant({ accountId, clientId: params.client_id });
  }

  // Everything asked for in "scope" and in the "claims" parameter...
  if (params.scope) grant.addOIDCScope(params.scope);
  if (params.claims) {
    const claims = JSON.parse(params.claims);
    grant.addOIDCClaims([...Object.keys(claims.id_token ?? {}), ...Object.keys(claims.userinfo ?? {})]);
  }
  // ...and whatever the consent prompt still names as missing.
  const missing = prompt.name === 'consent' ? prompt.details : {};
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return grant.save();
}

async function interactionOr400(provider, req, res, uid) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    sendHtml(res, 400, page('Error', `<p>${escapeHtml(err.message)}</p>`));
    return undefined;
  }
  if (details.uid !== uid) {
    sendHtml(res, 400, page('Error', '<p>interaction mismatch</p>'));
    return undefined;
  }
  return details;
}

// POST /__test__/rotate[?drop_old=1]: a new RS256 key with a new kid becomes
// the signing key.  The old keys stay in the JWKS (tokens they signed still
// verify) unless drop_old=1.  Answers {"kid": <new kid>, "kids": [<all kids>]}.
function rotate(provider, res, dropOld) {
  const key = newSigningKey();
  signingKeys = dropOld ? [key] : [key, ...signingKeys];
  initializeKeystore.call(provider, { keys: signingKeys });
  return sendJson(res, 200, { kid: key.kid, kids: signingKeys.map((k) => k.kid) });
}

// POST /__test__/user with a JSON user ({"sub": ..., "groups": [...], ...}):
// the user's claims from now on (userinfo, refreshed ID tokens), as if an
// administrator changed them at the provider; {"sub": ..., "deleted": true}
// removes the user (its tokens then no longer find an account).  Answers the
// user, or {"deleted": sub}.
function changeUser(res, change) {
  const sub = String(change.sub ?? '');
  if (!sub) return sendJson(res, 400, { error: 'sub is required' });
  if (change.deleted) {
    users.delete(sub);
    return sendJson(res, 200, { deleted: sub });
  }
  const user = { ...(users.get(sub) ?? {}), ...change, sub };
  users.set(sub, user);
  return sendJson(res, 200, user);
}

// ---------------------------------------------------------------------------
// Small helpers over node:http.

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, type, body) {
  res.writeHead(status, {
    'Content-Type': type, 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store',
  });
  res.end(body);
}

const sendHtml = (res, status, body) => send(res, status, 'text/html; charset=utf-8', body);
const sendText = (res, status, body) => send(res, status, 'text/plain; charset=utf-8', body);
const sendJson = (res, status, obj) => send(res, status, 'application/json', JSON.stringify(obj));
