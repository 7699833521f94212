// Talking to the explorer's server: every request goes to the page's own origin.
import { showMessage } from "./util.js";

export class ApiError extends Error {}

// The access token came in the URL (?token=...); the server has put it in an HttpOnly cookie,
// so it leaves the address bar (and any link copied from it).
(function dropTokenFromUrl() {
  const url = new URL(window.location.href);
  if (url.searchParams.has("token")) {
    url.searchParams.delete("token");
    window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
  }
})();

// The per-session CSRF token: the server sets the cookie, every write echoes it in a header
// (double submit; a page of another site can read neither).
function csrfToken() {
  const port = window.location.port || (window.location.protocol === "https:" ? "443" : "80");
  const name = `circuit_atlas_csrf_${port}=`;
  const found = document.cookie.split("; ").find((c) => c.startsWith(name));
  return found ? decodeURIComponent(found.slice(name.length)) : "";
}

export async function api(path, options = {}) {
  const opts = { ...options, headers: { ...(options.headers || {}) }, credentials: "same-origin" };
  const method = (opts.method || "GET").toUpperCase();
  if (method !== "GET" && method !== "HEAD") {
    if (typeof opts.body !== "string") opts.body = JSON.stringify(opts.body === undefined ? {} : opts.body);
    opts.headers["Content-Type"] = "application/json";
    opts.headers["X-CSRF-Token"] = csrfToken();
  }
  let response;
  try {
    response = await fetch(path, opts);
  } catch (err) {
    throw new ApiError(`the explorer's server did not answer (${err.message}): is circuit-atlas serve still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    throw new ApiError(`unexpected answer from the server for ${path} (status ${response.status})`);
  }
  if (!response.ok) throw new ApiError(data && data.error ? data.error : `request failed with status ${response.status}`);
  return data;
}

// Run an async action; show its error in the page instead of throwing.
export async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    showMessage(err.message || String(err), "error");
    return undefined;
  }
}
