import { dirname } from 'node:path';
import express, { Router } from 'express';
import swaggerUi from 'swagger-ui-express';
import type { OpenApiDocument } from '../openapi/spec';

// The files Swagger UI's page loads, and nothing else from its package (which also holds its
// package.json, a demo page and source maps).
// Its folder, found without loading the package (its main module loads the whole bundle into memory).
const SWAGGER_UI_DIST = dirname(require.resolve('swagger-ui-dist/package.json'));
const ASSETS = new Set(['swagger-ui.css', 'swagger-ui-bundle.js', 'swagger-ui-standalone-preset.js', 'favicon-32x32.png', 'favicon-16x16.png']);

/**
 * /openapi.json and the Swagger UI at /docs/, both from the same document the router is built from.
 * Under /docs/ only the page and the files it loads exist; any other path is the usual 404 envelope.
 */
export function docsRouter(doc: OpenApiDocument): Router {
  const router = Router();
  const [init] = swaggerUi.serveFiles(doc) as [express.RequestHandler];
  const page = swaggerUi.setup(doc, { customSiteTitle: 'keyward API' });
  // keyward's own Cache-Control (no-store) stays: serve-static would replace it.
  const assets = express.static(SWAGGER_UI_DIST, { index: false, fallthrough: false, cacheControl: false, dotfiles: 'deny' });
  router.get('/openapi.json', (_req, res) => {
    res.json(doc);
  });
  // The page's links are relative: it must be read at /docs/.
  router.get('/docs', (req, res, next) => (req.path === '/docs' ? res.redirect(301, '/docs/') : next()));
  router.get(['/docs/', '/docs/index.html'], page);
  router.get('/docs/swagger-ui-init.js', init);
  router.use('/docs', (req, res, next) => {
    if ((req.method === 'GET' || req.method === 'HEAD') && ASSETS.has(req.path.slice(1))) assets(req, res, next);
    else next();
  });
  return router;
}
