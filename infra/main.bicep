// `azd up` entry point: one resource group with everything the support-case app
// needs, all reached with one user-assigned managed identity (no keys, no
// passwords). See README.md, "Deploy to Azure".
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds the resource token and names the resource group.')
param environmentName string

@minLength(1)
@description('Region for every resource. It must offer Flex Consumption, Cosmos DB serverless (or Postgres Flexible Server) and the chosen Redis.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the deploying principal (azd sets AZURE_PRINCIPAL_ID). Gets data access to Cosmos DB and Redis for running the app locally against Azure, and is the Postgres Entra administrator. Empty: no grant.')
param principalId string = ''

@description('Kind of the deploying principal (AZURE_PRINCIPAL_TYPE): a user, or a service principal in CI.')
@allowed([
  'User'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('Name of the deploying principal as Postgres sees it (AZURE_PRINCIPAL_NAME): your user principal name, or a service principal\'s display name. Needed with the Postgres backend: it becomes the Entra administrator that creates the app\'s role.')
param principalName string = ''

@description('STATE_COLD_BACKEND: the cold tier the app uses. postgres deploys a PostgreSQL Flexible Server instead of Cosmos DB.')
@allowed([
  'cosmos'
  'postgres'
])
param stateColdBackend string = 'cosmos'

@description('POSTGRES_SKU: compute of the Postgres server (STATE_COLD_BACKEND=postgres). Its connections are shared by every instance, at least 2 each: Burstable B1ms (35 user connections) cannot serve the 40 instances Flex Consumption scales to at least, so it is not offered. The instance cap and POSTGRES_POOL_MAX_SIZE follow from it (postgresMaxInstances, postgresPoolMaxSize).')
@allowed([
  'Standard_B2s'
  'Standard_B2ms'
  'Standard_B4ms'
  'Standard_D2ds_v5'
  'Standard_D4ds_v5'
  'Standard_E2ds_v5'
])
param postgresSkuName string = 'Standard_B2s'

@description('Hot tier service. Azure Managed Redis is the default; Azure Cache for Redis is retiring (new caches only where the subscription may still create them): see README.md "Hot tier".')
@allowed([
  'AzureCacheForRedis'
  'AzureManagedRedis'
])
param redisKind string = 'AzureManagedRedis'

@description('Azure Managed Redis persistence (AZURE_REDIS_PERSISTENCE): None, or AOF (every second), which bounds what a Redis node failure loses of unflushed write-behind entries to about one second of writes.')
@allowed([
  'None'
  'AOF'
])
param redisPersistence string = 'None'

@description('Cosmos DB capacity mode: serverless (pay per request) or provisioned autoscale.')
param cosmosServerless bool = true

@description('Cosmos DB autoscale maximum RU/s of the container when cosmosServerless is false (whole thousands). The point of leaving serverless is more than its 5,000 RU/s per container (docs/CAPACITY.md), so the default is twice that; autoscale bills at least a tenth of it every hour.')
@minValue(1000)
@maxValue(1000000)
param cosmosAutoscaleMaxThroughput int = 10000

@description('STATE_COLD_TTL_SECONDS: cold-state retention in seconds; the app\'s timer deletes a thread, whole, this long after its last activity. -1 (the app default) keeps it forever. 0 is not a retention (the app refuses it; the preprovision hook stops `azd up` on it): read as -1 here, so nothing deploys 0.')
@minValue(-1)
@maxValue(2147483647)
param stateColdTtlSeconds int = -1

@description('STATE_HOT_TTL_SECONDS: TTL of cached workflow documents in Redis.')
@minValue(1)
param stateHotTtlSeconds int = 86400

@description('CORS_ALLOWED_ORIGINS: origins (comma-separated, e.g. https://portal.contoso.com) whose browser pages may call the API; empty: none.')
param corsAllowedOrigins string = ''

@description('AUTH_ALLOWED_CLIENT_IDS: application (client) ids, comma-separated, of further client applications whose tokens the API accepts (a daemon or managed identity holding an app role). The Azure CLI, which azd signs in as too, is always accepted.')
param authAllowedClientIds string = ''

@description('Python version of the Functions worker.')
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Function App scale-out limit (cost ceiling). Flex Consumption accepts 40..1000. With Postgres, lowered to the instances the server can give 2 connections each (see postgresSkuName).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('CASE_MAX_RUNS: case runs one Function App worker drives at once, and the concurrent HTTP requests one instance takes before the platform adds another (Flex Consumption gives Python apps 1 unless set). One value for both: concurrency above it meets the worker\'s 503 before scaling out; below it, instances idle.')
@minValue(1)
@maxValue(1000)
param caseMaxRuns int = 32

@description('VNET_ENABLED: private networking. The Function App joins a VNet; Storage, Cosmos DB, Redis and Postgres get private endpoints and private DNS zones, and their public network access is disabled.')
param vnetEnabled bool = false

@description('POSTGRES_ALLOW_AZURE_SERVICES: without vnetEnabled, let any Azure-hosted client (every Azure customer) through the Postgres firewall, the only route from the Function App then; Entra sign-in alone keeps others out. Ignored with vnetEnabled.')
param postgresAllowAzureServices bool = false

@description('POSTGRES_CLIENT_IP: an IP address allowed through the Postgres firewall (your machine, for the role hook and local runs). Empty: none. Ignored with vnetEnabled.')
param postgresClientIp string = ''

@description('Send resource logs and metrics of Cosmos DB, Redis, Postgres and Storage to Log Analytics.')
param diagnosticsEnabled bool = true

@description('Create metric alerts (Functions 5xx, Cosmos DB 429s, Redis server load and memory, write-behind backlog age).')
param alertsEnabled bool = true

@description('Create an availability test against /api/health.')
param availabilityTestEnabled bool = true

@description('HTTP status the availability test expects from /api/health.')
param healthExpectedStatus int = 200

@description('Deploy the operations workbook (infra/workbooks/operations.workbook.json).')
param workbookEnabled bool = true

@description('ALERT_EMAIL: who the alerts notify. Empty: alerts fire in the portal only.')
param alertEmail string = ''

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var usePostgres = stateColdBackend == 'postgres'
// Connections: each instance's pool may fill at once under load, so instances x
// POSTGRES_POOL_MAX_SIZE must fit the server's user connections, or requests fail with
// "too many connections". userConnections: the default max_connections of each compute less
// the 15 Azure keeps for replication and monitoring (Azure Database for PostgreSQL Flexible
// Server, "Limits": https://learn.microsoft.com/azure/postgresql/flexible-server/concepts-limits).
var postgresSkus = {
  Standard_B2s: {
    tier: 'Burstable'
    userConnections: 414
  }
  Standard_B2ms: {
    tier: 'Burstable'
    userConnections: 844
  }
  Standard_B4ms: {
    tier: 'Burstable'
    userConnections: 1703
  }
  Standard_D2ds_v5: {
    tier: 'GeneralPurpose'
    userConnections: 844
  }
  Standard_D4ds_v5: {
    tier: 'GeneralPurpose'
    userConnections: 1703
  }
  Standard_E2ds_v5: {
    tier: 'MemoryOptimized'
    userConnections: 1703
  }
}
// The postprovision role hook signs in as the administrator (one connection at a time)
// while the app may be running; the maintenance timer shares its worker's pool.
var postgresAppConnections = postgresSkus[postgresSkuName].userConnections - 1
// Fewer than 2 connections per worker would queue every run behind one: past that many
// instances, the cap is lowered (never below 40 for the SKUs offered: 413 / 2 = 206).
var postgresMaxInstances = min(maximumInstanceCount, postgresAppConnections / 2)
var appMaxInstances = usePostgres ? postgresMaxInstances : maximumInstanceCount
// The app's default pool (10) unless the server cannot give every instance that many.
var postgresPoolMaxSize = usePostgres ? min(10, postgresAppConnections / appMaxInstances) : 10
var useManagedRedis = redisKind == 'AzureManagedRedis'
// STATE_COLD_TTL_SECONDS: -1 or >= 1, never 0 (the app refuses 0). One parameter, fed back
// from the azd variable of the same name (main.parameters.json), so `azd env set` of the
// value `azd env get-values` shows is what the next provision deploys. The app's timer
// sweeps whole threads past it; the Cosmos container's own default TTL stays -1 (cosmos.bicep).
var stateColdTtl = stateColdTtlSeconds == 0 ? -1 : stateColdTtlSeconds
var publicNetworkAccess = vnetEnabled ? 'Disabled' : 'Enabled'
// Client applications whose access tokens the API accepts (the app's AUTH_ALLOWED_CLIENT_IDS
// and built-in authentication's allowedApplications): any other client a user consented
// to would call the API with that user's app roles. The Azure CLI's public client id
// (`az login`, `az account get-access-token`, DefaultAzureCredential's AzureCliCredential;
// azd reuses it for `azd auth login`), then the parameter's ids.
var azureCliClientId = '04b07795-8ddb-461a-bbee-02f9e1bf7b46'
var extraClientIds = map(split(authAllowedClientIds, ','), id => toLower(trim(id)))
var allowedClientIds = union([azureCliClientId], filter(extraClientIds, id => !empty(id)))
// Names the app reads as COSMOS_DATABASE / COSMOS_CONTAINER / POSTGRES_DATABASE
// (same as the defaults in state/settings.py).
var cosmosDatabaseName = 'agentstate'
var cosmosContainerName = 'state'
var postgresDatabaseName = 'agentstate'
// Private DNS zones, in a fixed order the private endpoints below index into:
// blob, table, the cold tier, Redis. No queue endpoint (nor zone): the app has an HTTP and
// a timer trigger, and the host keeps its timer locks in blobs (storage.bicep).
var privateDnsZoneNames = [
  'privatelink.blob.${environment().suffixes.storage}'
  'privatelink.table.${environment().suffixes.storage}'
  usePostgres ? 'privatelink.postgres.database.azure.com' : 'privatelink.documents.azure.com'
  useManagedRedis ? 'privatelink.redis.azure.net' : 'privatelink.redis.cache.windows.net'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    identityPrincipalId: identity.outputs.principalId
  }
}

var logAnalyticsWorkspaceId = diagnosticsEnabled ? monitoring.outputs.logAnalyticsId : ''

module network 'modules/network.bicep' = if (vnetEnabled) {
  name: 'network'
  scope: rg
  params: {
    name: '${abbrs.networkVirtualNetworks}${resourceToken}'
    location: location
    tags: tags
    privateDnsZoneNames: privateDnsZoneNames
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    identityPrincipalId: identity.outputs.principalId
    publicNetworkAccess: publicNetworkAccess
    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId
  }
}

// Cosmos DB is the cold tier unless Postgres is chosen; it is not deployed then.
module cosmos 'modules/cosmos.bicep' = if (!usePostgres) {
  name: 'cosmos'
  scope: rg
  params: {
    accountName: '${abbrs.documentDBDatabaseAccounts}${resourceToken}'
    location: location
    tags: tags
    databaseName: cosmosDatabaseName
    containerName: cosmosContainerName
    serverless: cosmosServerless
    autoscaleMaxThroughput: cosmosAutoscaleMaxThroughput
    identityPrincipalId: identity.outputs.principalId
    developerPrincipalId: principalId
    publicNetworkAccess: publicNetworkAccess
    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId
  }
}

module redis 'modules/redis.bicep' = {
  name: 'redis'
  scope: rg
  params: {
    kind: redisKind
    name: useManagedRedis ? '${abbrs.cacheRedisEnterprise}${resourceToken}' : '${abbrs.cacheRedis}${resourceToken}'
    location: location
    tags: tags
    managedRedisPersistence: redisPersistence
    identityPrincipalId: identity.outputs.principalId
    developerPrincipalId: principalId
    publicNetworkAccess: publicNetworkAccess
    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId
  }
}

module postgres 'modules/postgres.bicep' = if (usePostgres) {
  name: 'postgres'
  scope: rg
  params: {
    name: '${abbrs.dBforPostgreSQLServers}${resourceToken}'
    location: location
    tags: tags
    databaseName: postgresDatabaseName
    identityName: identity.outputs.name
    administratorObjectId: empty(principalName) ? '' : principalId
    administratorName: principalName
    administratorType: principalType
    publicNetworkAccess: publicNetworkAccess
    allowAzureServices: !vnetEnabled && postgresAllowAzureServices
    clientIpAddress: vnetEnabled ? '' : postgresClientIp
    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId
    skuName: postgresSkuName
    skuTier: postgresSkus[postgresSkuName].tier
  }
}

// ---------------------------------------------------------------- private endpoints (vnetEnabled)

module storageBlobEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled) {
  name: 'pe-storage-blob'
  scope: rg
  params: {
    name: '${abbrs.networkPrivateEndpoints}blob-${resourceToken}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    serviceId: storage.outputs.id
    groupId: 'blob'
    privateDnsZoneId: network.outputs.zoneIds[0]
  }
}

module storageTableEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled) {
  name: 'pe-storage-table'
  scope: rg
  params: {
    name: '${abbrs.networkPrivateEndpoints}table-${resourceToken}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    serviceId: storage.outputs.id
    groupId: 'table'
    privateDnsZoneId: network.outputs.zoneIds[1]
  }
}

module cosmosEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled && !usePostgres) {
  name: 'pe-cosmos'
  scope: rg
  params: {
    name: '${abbrs.networkPrivateEndpoints}cosmos-${resourceToken}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    serviceId: cosmos.outputs.id
    groupId: 'Sql'
    privateDnsZoneId: network.outputs.zoneIds[2]
  }
}

module postgresEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled && usePostgres) {
  name: 'pe-postgres'
  scope: rg
  params: {
    name: '${abbrs.networkPrivateEndpoints}psql-${resourceToken}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    serviceId: postgres.outputs.id
    groupId: 'postgresqlServer'
    privateDnsZoneId: network.outputs.zoneIds[2]
  }
}

module redisEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled) {
  name: 'pe-redis'
  scope: rg
  params: {
    name: '${abbrs.networkPrivateEndpoints}redis-${resourceToken}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    serviceId: redis.outputs.id
    groupId: useManagedRedis ? 'redisEnterprise' : 'redisCache'
    privateDnsZoneId: network.outputs.zoneIds[3]
  }
}

module apiRegistration 'modules/api-registration.bicep' = {
  name: 'api-registration'
  scope: rg
  params: {
    uniqueName: 'agent-state-api-${resourceToken}'
    displayName: 'agent-state API (${environmentName})'
    developerPrincipalId: principalId
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    pythonVersion: pythonVersion
    maximumInstanceCount: appMaxInstances
    caseMaxRuns: caseMaxRuns
    stateColdBackend: stateColdBackend
    cosmosEndpoint: usePostgres ? '' : cosmos.outputs.endpoint
    cosmosDatabase: cosmosDatabaseName
    cosmosContainer: cosmosContainerName
    redisHost: redis.outputs.hostName
    redisPort: redis.outputs.sslPort
    postgresHost: usePostgres ? postgres.outputs.host : ''
    postgresDatabase: postgresDatabaseName
    postgresUser: usePostgres ? postgres.outputs.user : ''
    postgresPoolMaxSize: postgresPoolMaxSize
    stateHotTtlSeconds: stateHotTtlSeconds
    stateColdTtlSeconds: stateColdTtl
    corsAllowedOrigins: corsAllowedOrigins
    virtualNetworkSubnetId: vnetEnabled ? network.outputs.appSubnetId : ''
    authClientId: apiRegistration.outputs.clientId
    authAllowedClientIds: allowedClientIds
  }
  // With private endpoints, the host must not start before its storage is reachable.
  dependsOn: [
    storageBlobEndpoint
    storageTableEndpoint
  ]
}

module apiAuthSettings 'modules/api-auth-settings.bicep' = {
  name: 'api-auth-settings'
  scope: rg
  params: {
    functionAppName: functionApp.outputs.name
    clientId: apiRegistration.outputs.clientId
    allowedClientIds: allowedClientIds
  }
}

module observability 'modules/observability.bicep' = {
  name: 'observability'
  scope: rg
  params: {
    namePrefix: 'agent-state-${resourceToken}'
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    functionAppId: functionApp.outputs.id
    functionAppUri: functionApp.outputs.uri
    cosmosAccountId: usePostgres ? '' : cosmos.outputs.id
    redisId: redis.outputs.id
    redisKind: redisKind
    alertsEnabled: alertsEnabled
    availabilityTestEnabled: availabilityTestEnabled
    healthExpectedStatus: healthExpectedStatus
    workbookEnabled: workbookEnabled
    alertEmail: alertEmail
  }
}

// Outputs land in the azd environment (.azure/<env>/.env); scripts/azd/local_settings.py
// turns them into function_app/local.settings.json and scripts/azd/postgres_access.py
// creates the app's Postgres role. Names and endpoints only: no secret.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = functionApp.outputs.uri
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_FUNCTION_IDENTITY_NAME string = identity.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_COSMOS_ACCOUNT_NAME string = usePostgres ? '' : cosmos.outputs.accountName
output AZURE_REDIS_KIND string = redisKind
output AZURE_REDIS_NAME string = redis.outputs.name
output AZURE_APPLICATION_INSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output AZURE_POSTGRES_SERVER_NAME string = usePostgres ? postgres.outputs.name : ''
output VNET_ENABLED bool = vnetEnabled
output STATE_COLD_BACKEND string = stateColdBackend
// Every app setting the deployment chooses (a parameter, or computed from one) is output
// under its own name, so `azd env get-values` shows what the app runs with and the
// postprovision hook gives a local run the same values.
output STATE_COLD_TTL_SECONDS int = stateColdTtl
output STATE_HOT_TTL_SECONDS int = stateHotTtlSeconds
output CASE_MAX_RUNS int = caseMaxRuns
output POSTGRES_POOL_MAX_SIZE int = postgresPoolMaxSize
output CORS_ALLOWED_ORIGINS string = corsAllowedOrigins
output COSMOS_ENDPOINT string = usePostgres ? '' : cosmos.outputs.endpoint
// Callers (and `agent-state` with AGENT_STATE_SCOPE=<AUTH_AUDIENCE>/.default) ask Entra
// for tokens for this client id.
output AUTH_TENANT_ID string = tenant().tenantId
output AUTH_AUDIENCE string = apiRegistration.outputs.clientId
// The clients the API accepts, for the app run locally against these resources (the
// postprovision hook); fed back as the parameter, it gives the same list.
output AUTH_ALLOWED_CLIENT_IDS string = join(allowedClientIds, ',')
output COSMOS_DATABASE string = cosmosDatabaseName
output COSMOS_CONTAINER string = cosmosContainerName
output REDIS_HOST string = redis.outputs.hostName
output REDIS_PORT int = redis.outputs.sslPort
output REDIS_SSL string = 'true'
output POSTGRES_HOST string = usePostgres ? postgres.outputs.host : ''
output POSTGRES_DATABASE string = postgresDatabaseName
output POSTGRES_USER string = usePostgres ? postgres.outputs.user : ''
