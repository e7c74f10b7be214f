// The Function App on Flex Consumption, running as the user-assigned identity.
// The app settings are exactly the names support_cases/settings.py reads (plus the
// Functions host's own identity-based storage settings); a test keeps them in
// sync. Secrets with an identity alternative (COSMOS_KEY, REDIS_URL,
// POSTGRES_URL) are deliberately absent.

@description('Function App name.')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region.')
param location string

@description('Tags for every resource in this module.')
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID, AzureWebJobsStorage__clientId).')
param identityClientId string

@description('Storage account used by the host (AzureWebJobsStorage) and for deployment packages.')
param storageAccountName string

@description('Blob container holding deployment packages.')
param deploymentContainerName string

@description('Application Insights component the app sends telemetry to.')
param applicationInsightsName string

@description('Python version of the Functions worker.')
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Memory per instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Scale-out limit (cost ceiling). Flex Consumption accepts 40..1000.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('CASE_MAX_RUNS: case runs one worker drives at once. Also the HTTP concurrency per instance (the requests the platform sends one instance before it scales out): unset, Flex Consumption gives Python apps 1, so each event stream (up to 200 s) would hold a whole instance and maximumInstanceCount open streams would leave no instance for any other request; above CASE_MAX_RUNS, a burst of submits would meet the worker\'s 503 instead of scaling out. One parameter feeds both, so they cannot drift apart.')
@minValue(1)
@maxValue(1000)
param caseMaxRuns int = 32

@description('STATE_COLD_BACKEND.')
@allowed([
  'cosmos'
  'postgres'
])
param stateColdBackend string

@description('COSMOS_ENDPOINT.')
param cosmosEndpoint string

@description('COSMOS_DATABASE.')
param cosmosDatabase string

@description('COSMOS_CONTAINER.')
param cosmosContainer string

@description('REDIS_HOST.')
param redisHost string

@description('REDIS_PORT (TLS port).')
param redisPort int

@description('POSTGRES_HOST (empty when the Postgres backend is not deployed).')
param postgresHost string = ''

@description('POSTGRES_DATABASE.')
param postgresDatabase string

@description('POSTGRES_USER (empty when the Postgres backend is not deployed).')
param postgresUser string = ''

@description('POSTGRES_POOL_MAX_SIZE: connections one worker opens at most; main.bicep sizes it so maximumInstanceCount pools fit the server.')
@minValue(2)
param postgresPoolMaxSize int = 10

@description('STATE_HOT_TTL_SECONDS.')
@minValue(1)
param stateHotTtlSeconds int = 86400

@description('STATE_COLD_TTL_SECONDS (-1: keep forever; never 0, which Cosmos DB rejects).')
@minValue(-1)
@maxValue(2147483647)
param stateColdTtlSeconds int = -1

@description('CORS_ALLOWED_ORIGINS: origins whose browser pages may call the API (the app answers CORS itself: the platform\'s CORS stays unset so the two never both answer).')
param corsAllowedOrigins string = ''

@description('AUTH_AUDIENCE: client id of the API app registration (api-registration.bicep).')
param authClientId string

@description('AUTH_ALLOWED_CLIENT_IDS: client ids of the applications whose tokens the app accepts.')
param authAllowedClientIds array

@description('Subnet (delegated to Microsoft.App/environments) for outbound VNet integration. Empty: none.')
param virtualNetworkSubnetId string = ''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    // TLS 1.2 at least on both the app and its Kudu (scm) endpoint, and no FTP(S) server
    // at all: azd deploys through the platform with an Entra token, never over FTP.
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        triggers: {
          http: {
            perInstanceConcurrency: caseMaxRuns
          }
        }
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }

  resource appSettings 'config' = {
    name: 'appsettings'
    properties: {
      // Functions host: identity-based AzureWebJobsStorage (no connection string).
      AzureWebJobsStorage__accountName: storage.name
      AzureWebJobsStorage__credential: 'managedidentity'
      AzureWebJobsStorage__clientId: identityClientId
      // Worker telemetry (host.json telemetryMode: OpenTelemetry). The app exports with its
      // own Entra-authenticated Azure Monitor exporter (support_cases/telemetry.py), so:
      // PYTHON_ENABLE_OPENTELEMETRY lets the worker hand each invocation's trace context
      // to the app's spans (host and worker share one trace) without exporting anything;
      // PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY stays false, or the worker would call
      // configure_azure_monitor() itself, without a credential (rejected: local auth is
      // disabled) and as a second exporter.
      PYTHON_ENABLE_OPENTELEMETRY: 'true'
      PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'false'
      // Telemetry: read by the host and by the app; ingestion is Entra-authenticated.
      APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
      OTEL_SERVICE_NAME: 'support-cases'
      // Identity used by azure-identity (Cosmos, Postgres) and redis-entraid (Redis).
      AZURE_CLIENT_ID: identityClientId
      // Cold tier.
      STATE_COLD_BACKEND: stateColdBackend
      COSMOS_ENDPOINT: cosmosEndpoint
      COSMOS_DATABASE: cosmosDatabase
      COSMOS_CONTAINER: cosmosContainer
      COSMOS_CREATE_IF_MISSING: 'false'
      COSMOS_OPERATION_TIMEOUT_SECONDS: '30'
      POSTGRES_HOST: postgresHost
      POSTGRES_DATABASE: postgresDatabase
      POSTGRES_USER: postgresUser
      POSTGRES_POOL_MIN_SIZE: '1'
      POSTGRES_POOL_MAX_SIZE: string(postgresPoolMaxSize)
      POSTGRES_POOL_TIMEOUT_SECONDS: '10'
      POSTGRES_OPERATION_TIMEOUT_SECONDS: '30'
      // Hot tier (Entra auth, TLS only).
      REDIS_HOST: redisHost
      REDIS_PORT: string(redisPort)
      REDIS_SSL: 'true'
      REDIS_MAX_CONNECTIONS: '50'
      REDIS_MAX_WAITING_READS: '100'
      // Retention and size (defaults of state/settings.py).
      STATE_HOT_TTL_SECONDS: string(stateHotTtlSeconds)
      STATE_COLD_TTL_SECONDS: string(stateColdTtlSeconds)
      STATE_COMPRESS_THRESHOLD_BYTES: '16384'
      STATE_MAX_ITEM_BYTES: '1800000'
      STATE_LOCK_TTL_MS: '30000'
      STATE_FLUSH_LOCK_TTL_MS: '5000'
      STATE_WRITE_MODE: 'write-behind'
      STATE_BACKLOG_DEGRADED_SECONDS: '60'
      STATE_MESSAGE_WINDOW: '50'
      // Section names (comma-separated) the size manager prunes, truncates or archives.
      STATE_MESSAGE_SECTIONS: ''
      STATE_REASONING_SECTIONS: ''
      STATE_ARCHIVABLE_SECTIONS: ''
      STATE_REASONING_MAX_CHARS: '4000'
      // Workflow.
      CASE_REVIEW_THRESHOLD: '500'
      CASE_STALE_AFTER_SECONDS: '300'
      CASE_MAX_BODY_BYTES: '262144'
      CASE_SYNC_WAIT_SECONDS: '20'
      API_REQUEST_DEADLINE_SECONDS: '10'
      CASE_EFFECT_TIMEOUT_SECONDS: '30'
      CASE_MAX_RUNS: string(caseMaxRuns)
      CASE_MAX_EVENT_STREAMS: '100'
      CASE_MAX_EVENT_STREAMS_PER_CALLER: '10'
      CASE_DUPLICATE_WINDOW_SECONDS: '86400'
      CASE_DEFAULT_STRATEGY: 'enqueue'
      CORS_ALLOWED_ORIGINS: corsAllowedOrigins
      // Callers: Entra ID tokens for the API's app registration, checked by the app.
      // Never AUTH_DISABLED in Azure (the app refuses it); issuer and keys are Entra's.
      AUTH_DISABLED: 'false'
      AUTH_TENANT_ID: tenant().tenantId
      AUTH_AUDIENCE: authClientId
      AUTH_ISSUER: ''
      AUTH_JWKS_URL: ''
      AUTH_ALLOWED_CLIENT_IDS: join(authAllowedClientIds, ',')
    }
  }

  // azd deploys with an Entra token: the Kudu (scm) and FTP user name / password that
  // App Service otherwise keeps for every site are turned off, so no key can publish code.
  resource scmBasicAuth 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: {
      allow: false
    }
  }

  resource ftpBasicAuth 'basicPublishingCredentialsPolicies' = {
    name: 'ftp'
    properties: {
      allow: false
    }
  }
}

output id string = functionApp.id
output name string = functionApp.name
output uri string = 'https://${functionApp.properties.defaultHostName}'
