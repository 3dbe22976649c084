import express, { Router } from 'express';
import { join } from 'node:path';
import { findProjectPath } from '../project-files';

/**
 * The self-service page at /sso/: static files (public/sso/), no data in them. The page asks the /sso
 * API, which is where sign-in is checked, so serving the files needs no identity. Everything runs
 * under keyward's CSP: scripts and styles from this origin only, nothing inline.
 */
export function ssoPageRouter(): Router {
  const router = Router();
  router.use(
    '/sso',
    express.static(findProjectPath(join('public', 'sso')), {
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
