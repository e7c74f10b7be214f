// `azd up` entry point: one resource group with everything the support-case app
// needs, all reached with one user-assigned managed identity (no keys, no
// passwords). See README.md, "Deploy to Azure".
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds the resource token and names the resource group.')
param environmentName string

@minLength(1)
@description('Region for every resource. It must offer Flex Consumption, Cosmos DB serverless and the chosen Redis.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the deploying user (azd sets AZURE_PRINCIPAL_ID). Gets data access to Cosmos DB and Redis for running the app locally against Azure. Empty: no grant.')
param principalId string = ''

@description('STATE_COLD_BACKEND: the cold tier the app uses. postgres also deploys a PostgreSQL Flexible Server.')
@allowed([
  'cosmos'
  'postgres'
])
param stateColdBackend string = 'cosmos'

@description('Hot tier service.')
@allowed([
  'AzureCacheForRedis'
  'AzureManagedRedis'
])
param redisKind string = 'AzureCacheForRedis'

@description('Cosmos DB capacity mode: serverless (pay per request) or provisioned autoscale.')
param cosmosServerless bool = true

@description('STATE_COLD_TTL_SECONDS and the Cosmos container default TTL (-1: keep forever).')
@minValue(-1)
param stateColdTtlSeconds int = -1

@description('STATE_HOT_TTL_SECONDS: TTL of cached workflow documents in Redis.')
@minValue(1)
param stateHotTtlSeconds int = 86400

@description('Python version of the Functions worker.')
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Function App scale-out limit (cost ceiling).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var usePostgres = stateColdBackend == 'postgres'
// Names the app reads as COSMOS_DATABASE / COSMOS_CONTAINER / POSTGRES_DATABASE
// (same as the defaults in state/settings.py).
var cosmosDatabaseName = 'agentstate'
var cosmosContainerName = 'state'
var postgresDatabaseName = 'agentstate'

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

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    identityPrincipalId: identity.outputs.principalId
  }
}

module cosmos 'modules/cosmos.bicep' = {
  name: 'cosmos'
  scope: rg
  params: {
    accountName: '${abbrs.documentDBDatabaseAccounts}${resourceToken}'
    location: location
    tags: tags
    databaseName: cosmosDatabaseName
    containerName: cosmosContainerName
    serverless: cosmosServerless
    defaultTtl: stateColdTtlSeconds
    identityPrincipalId: identity.outputs.principalId
    developerPrincipalId: principalId
  }
}

module redis 'modules/redis.bicep' = {
  name: 'redis'
  scope: rg
  params: {
    kind: redisKind
    name: redisKind == 'AzureCacheForRedis' ? '${abbrs.cacheRedis}${resourceToken}' : '${abbrs.cacheRedisEnterprise}${resourceToken}'
    location: location
    tags: tags
    identityPrincipalId: identity.outputs.principalId
    developerPrincipalId: principalId
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
    identityPrincipalId: identity.outputs.principalId
    identityName: identity.outputs.name
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
    maximumInstanceCount: maximumInstanceCount
    stateColdBackend: stateColdBackend
    cosmosEndpoint: cosmos.outputs.endpoint
    cosmosDatabase: cosmos.outputs.databaseName
    cosmosContainer: cosmos.outputs.containerName
    redisHost: redis.outputs.hostName
    redisPort: redis.outputs.sslPort
    postgresHost: usePostgres ? postgres.outputs.host : ''
    postgresDatabase: postgresDatabaseName
    postgresUser: usePostgres ? postgres.outputs.user : ''
    stateHotTtlSeconds: stateHotTtlSeconds
    stateColdTtlSeconds: stateColdTtlSeconds
    authClientId: apiRegistration.outputs.clientId
  }
}

module apiAuthSettings 'modules/api-auth-settings.bicep' = {
  name: 'api-auth-settings'
  scope: rg
  params: {
    functionAppName: functionApp.outputs.name
    clientId: apiRegistration.outputs.clientId
  }
}

// Outputs land in the azd environment (.azure/<env>/.env); scripts/azd/local_settings.py
// turns them into function_app/local.settings.json. Names and endpoints only: no secret.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = functionApp.outputs.uri
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_COSMOS_ACCOUNT_NAME string = cosmos.outputs.accountName
output AZURE_REDIS_KIND string = redisKind
output AZURE_REDIS_NAME string = redis.outputs.name
output AZURE_APPLICATION_INSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output STATE_COLD_BACKEND string = stateColdBackend
output COSMOS_ENDPOINT string = cosmos.outputs.endpoint
// Callers (and `agent-state` with AGENT_STATE_SCOPE=<AUTH_AUDIENCE>/.default) ask Entra
// for tokens for this client id.
output AUTH_TENANT_ID string = tenant().tenantId
output AUTH_AUDIENCE string = apiRegistration.outputs.clientId
output COSMOS_DATABASE string = cosmos.outputs.databaseName
output COSMOS_CONTAINER string = cosmos.outputs.containerName
output REDIS_HOST string = redis.outputs.hostName
output REDIS_PORT int = redis.outputs.sslPort
output REDIS_SSL string = 'true'
output POSTGRES_HOST string = usePostgres ? postgres.outputs.host : ''
output POSTGRES_DATABASE string = postgresDatabaseName
output POSTGRES_USER string = usePostgres ? postgres.outputs.user : ''
