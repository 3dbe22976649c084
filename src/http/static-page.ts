import express, { Router } from 'express';
import { join } from 'node:path';
import { findProjectPath } from '../project-files';

/**
 * A browser page made of static files (public/<folder>/) mounted at `mount`: the /sso/ page and the
 * admin console. The files hold no data: the page asks the API, which is where sign-in and scopes are
 * checked, so serving them needs no identity. Everything runs under keyward's CSP: scripts and styles
 * from this origin only, nothing inline.
 */
export function staticPage(mount: string, folder: string): Router {
  const router = Router();
  router.use(
    mount,
    express.static(findProjectPath(join('public', folder)), {
      index: 'index.html',
      // /sso redirects to /sso/ so the page's relative links resolve under it.
      redirect: true,
      dotfiles: 'ignore',
      fallthrough: true,
      // keyward's own Cache-Control (no-store) stays: serve-static would replace it.
      cacheControl: false,
    }),
  );
  return router;
}
