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
// Transactional batch (the Python SDK's `execute_item_batch`): the package runs a
// batch as bulk, reading each operation's partition key from the operation (the
// Python SDK sends it once, in the header: every batch failed to parse) and
// keeping what ran before a failure. Real Cosmos applies a batch all or nothing
// within one partition, at most 100 operations; so does this handler: it runs
// the operations in order without yielding (no other request interleaves) and,
// if one fails, restores every document it touched and answers 424 for the rest.
const batchDocuments = require("@vercel/cosmosdb-server/lib/handler/batch-documents");
const documentOperations = require("@vercel/cosmosdb-server/lib/handler/_document-operations");
const readJson = require("@vercel/cosmosdb-server/lib/json").default;
const MAX_BATCH_OPERATIONS = 100;
const batchOperations = {
  Create: documentOperations.createOperation,
  Upsert: documentOperations.upsertOperation,
  Read: documentOperations.readOperation,
  Delete: documentOperations.deleteOperation,
  Replace: documentOperations.replaceOperation,
};
batchDocuments.default = async (account, req, res, { dbId, collId }) => {
  const body = await readJson(req);
  const collection = account.database(dbId).collection(collId);
  if (!collection.read()) {
    res.statusCode = 404;
    return {};
  }
  const header = req.headers["x-ms-documentdb-partitionkey"];
  let partition;
  try {
    partition = JSON.parse(header)[0];
  } catch (error) {
    partition = undefined;
  }
  if (!Array.isArray(body) || partition === undefined) {
    res.statusCode = 400;
    return { code: "BadRequest", message: "A batch needs an array of operations and a partition key." };
  }
  if (body.length === 0 || body.length > MAX_BATCH_OPERATIONS) {
    res.statusCode = 400;
    return { code: "BadRequest", message: `A batch holds 1 to ${MAX_BATCH_OPERATIONS} operations.` };
  }
  const keyPath = collection.documents._getPartitionKeyPath();
  const partitionOf = (doc) => keyPath.reduce((value, key) => (value == null ? value : value[key]), doc);
  const before = new Map();
  const results = [];
  let failed = false;
  for (const input of body) {
    if (failed) {
      results.push({ statusCode: 424, requestCharge: 0 });
      continue;
    }
    const run = batchOperations[input && input.operationType];
    const id = input && (input.id || (input.resourceBody && input.resourceBody.id));
    if (!run || (input.resourceBody && partitionOf(input.resourceBody) !== partition)) {
      results.push({ statusCode: 400, requestCharge: 0 });
      failed = true;
      continue;
    }
    if (id && !before.has(id)) {
      before.set(id, collection.document(id, partition).read() || null);
    }
    const result = run(collection, { ...input, partitionKey: JSON.stringify([partition]) });
    failed = result.statusCode >= 400;
    results.push(
      failed
        ? { statusCode: result.statusCode, requestCharge: 0 }
        : {
            statusCode: result.statusCode,
            requestCharge: 1,
            eTag: result.body ? result.body._etag : undefined,
            resourceBody: result.body,
          }
    );
  }
  if (failed) {
    for (const [id, original] of [...before].reverse()) {
      if (collection.document(id, partition).read()) {
        collection.documents.delete(id, partition);
      }
      if (original) {
        collection.documents._set(original);
      }
    }
    for (let i = 0; i < results.length; i += 1) {
      if (results[i].statusCode < 400) results[i] = { statusCode: 424, requestCharge: 0 };
    }
  }
  return results;
};
// The Python SDK sends a batch with the query content type, which the router takes
// for a query: such a request goes to the batch handler.
const queryDocuments = require("@vercel/cosmosdb-server/lib/handler/query-documents");
const queryDocumentsUnpatched = queryDocuments.default;
const trueHeader = require("@vercel/cosmosdb-server/lib/true-header").default;
queryDocuments.default = (account, req, res, params) =>
  trueHeader(req, "x-ms-cosmos-is-batch-request")
    ? batchDocuments.default(account, req, res, params)
    : queryDocumentsUnpatched(account, req, res, params);
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
