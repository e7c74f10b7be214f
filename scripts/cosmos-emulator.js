// Starts the Cosmos DB-compatible emulator with keep-alive connections.
// The package's own CLI closes every connection, which makes each SDK call
// pay a fresh TLS handshake (~20x slower per request).
"use strict";
// Point reads of a missing document crash the handler (it dereferences the
// absent document) and answer 500; real Cosmos answers 404. The route table
// copies the handler when the package loads, so wrap it before that.
const readDocument = require("@vercel/cosmosdb-server/lib/handler/read-document");
const readDocumentUnpatched = readDocument.default;
readDocument.default = (account, req, res, params) => {
  try {
    return readDocumentUnpatched(account, req, res, params);
  } catch (error) {
    if (!(error instanceof TypeError)) throw error;
    res.statusCode = 404;
    return {
      code: "NotFound",
      message: "Entity with the specified id does not exist in the system.",
    };
  }
};
const { createHttpsServer } = require("@vercel/cosmosdb-server");

const port = parseInt(process.argv[2] || "8081", 10);
const host = process.argv[3] || "127.0.0.1";

const server = createHttpsServer({ keepAlive: true });
server.keepAliveTimeout = 120000;
server.listen(port, host, () => {
  const address = server.address();
  console.log(`cosmos emulator ready at https://${host}:${address.port}/`);
});

const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
