import { Router } from 'express';
import swaggerUi from 'swagger-ui-express';
import type { OpenApiDocument } from '../openapi/spec';

/** /openapi.json and the Swagger UI at /docs, both from the same document the router is built from. */
export function docsRouter(doc: OpenApiDocument): Router {
  const router = Router();
  router.get('/openapi.json', (_req, res) => {
    res.json(doc);
  });
  router.use('/docs', swaggerUi.serveFiles(doc), swaggerUi.setup(doc, { customSiteTitle: 'keyward API' }));
  return router;
}
