// What an operator watches: metric alerts (Functions 5xx, Cosmos DB 429s, Redis
// server load and memory, the write-behind backlog age the app reports as a
// custom metric), an availability test against /api/health and a workbook.
// Each part has an off switch in main.bicep. Diagnostic settings live next to
// the resource they describe (each module's logAnalyticsWorkspaceId).

@description('Name prefix for the resources of this module.')
param namePrefix string

@description('Azure region.')
param location string

@description('Tags for every resource in this module.')
param tags object = {}

@description('Application Insights component (availability test, custom metrics, workbook).')
param applicationInsightsId string

@description('Function App resource id.')
param functionAppId string

@description('Function App base URL (https://host).')
param functionAppUri string

@description('Cosmos DB account resource id. Empty when Postgres is the cold tier.')
param cosmosAccountId string = ''

@description('Redis resource id.')
param redisId string

@description('Which Redis service redisId is.')
@allowed([
  'AzureCacheForRedis'
  'AzureManagedRedis'
])
param redisKind string

@description('Create the metric alerts.')
param alertsEnabled bool = true

@description('Create the availability test against /api/health.')
param availabilityTestEnabled bool = true

@description('HTTP status the availability test expects from /api/health.')
param healthExpectedStatus int = 200

@description('Deploy the operations workbook.')
param workbookEnabled bool = true

@description('E-mail address notified by the alerts. Empty: alerts fire without a notification.')
param alertEmail string = ''

@description('Alert when the oldest unflushed write-behind entry is older than this (seconds).')
@minValue(1)
param backlogAgeThresholdSeconds int = 120

var redisNamespace = redisKind == 'AzureCacheForRedis' ? 'Microsoft.Cache/redis' : 'Microsoft.Cache/redisEnterprise'
var notify = !empty(alertEmail)
var actions = notify ? [
  {
    actionGroupId: actionGroup.id
  }
] : []
// The app's OpenTelemetry metric names (function_app/support_cases/metrics.py).
var backlogAgeMetric = 'agent_state.write_behind.oldest_age_seconds'
var backlogLossesMetric = 'agent_state.write_behind.losses'
var backlogStuckMetric = 'agent_state.write_behind.stuck_threads'

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (alertsEnabled && notify) {
  name: '${namePrefix}-ops'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'agentstate'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource functions5xx 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-functions-5xx'
  location: 'global'
  tags: tags
  properties: {
    description: 'The Function App answered HTTP 5xx.'
    severity: 2
    enabled: true
    scopes: [
      functionAppId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'http5xx'
          metricNamespace: 'Microsoft.Web/sites'
          metricName: 'Http5xx'
          operator: 'GreaterThan'
          threshold: 5
          timeAggregation: 'Total'
        }
      ]
    }
    actions: actions
  }
}

resource cosmos429 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled && !empty(cosmosAccountId)) {
  name: '${namePrefix}-cosmos-429'
  location: 'global'
  tags: tags
  properties: {
    description: 'Cosmos DB throttled requests (429): the cold tier is at its RU limit.'
    severity: 2
    enabled: true
    scopes: [
      cosmosAccountId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'throttled'
          metricNamespace: 'Microsoft.DocumentDB/databaseAccounts'
          metricName: 'TotalRequests'
          dimensions: [
            {
              name: 'StatusCode'
              operator: 'Include'
              values: [
                '429'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 10
          timeAggregation: 'Count'
        }
      ]
    }
    actions: actions
  }
}

resource redisServerLoad 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-redis-server-load'
  location: 'global'
  tags: tags
  properties: {
    description: 'Redis server load above 80%: the hot tier is close to saturation.'
    severity: 2
    enabled: true
    scopes: [
      redisId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'serverLoad'
          metricNamespace: redisNamespace
          metricName: 'serverLoad'
          operator: 'GreaterThan'
          threshold: 80
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: actions
  }
}

resource redisMemory 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-redis-memory'
  location: 'global'
  tags: tags
  properties: {
    description: 'Redis memory above 85%: keys with a TTL are being evicted; unflushed write-behind entries (no TTL) are not, so writes start failing when it fills.'
    severity: 2
    enabled: true
    scopes: [
      redisId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'usedMemory'
          metricNamespace: redisNamespace
          metricName: 'usedmemorypercentage'
          operator: 'GreaterThan'
          threshold: 85
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: actions
  }
}

// A custom metric from the app (OpenTelemetry gauge -> Application Insights
// customMetrics). It exists only once the app has reported it, hence
// skipMetricValidation.
resource backlogAge 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-write-behind-backlog-age'
  location: 'global'
  tags: tags
  properties: {
    description: 'The oldest write-behind entry not yet in the cold tier is too old: the flusher is stuck or the cold tier is failing.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'backlogAge'
          metricNamespace: 'azure.applicationinsights'
          metricName: backlogAgeMetric
          operator: 'GreaterThan'
          threshold: backlogAgeThresholdSeconds
          timeAggregation: 'Maximum'
          skipMetricValidation: true
        }
      ]
    }
    actions: actions
  }
}

// Redis lost acknowledged checkpoints before the flush (a restart without persistence, an
// eviction, a FLUSHALL): each run affected went on from the cold tier, but the hot tier's
// durability settings deserve a look (README "Hot tier"). Custom metric, as above.
resource backlogLosses 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-write-behind-losses'
  location: 'global'
  tags: tags
  properties: {
    description: 'Redis lost write-behind checkpoints before they reached the cold tier; the runs concerned went on from the cold tier.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'backlogLosses'
          metricNamespace: 'azure.applicationinsights'
          metricName: backlogLossesMetric
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
          skipMetricValidation: true
        }
      ]
    }
    actions: actions
  }
}

// A write-behind entry the cold store refuses for good holds its thread's later steps
// back until an operator resolves it (README "Stuck entries": `agent-state write-behind
// stuck` / `discard`). Custom metric, as above.
resource backlogStuck 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: '${namePrefix}-write-behind-stuck'
  location: 'global'
  tags: tags
  properties: {
    description: 'A write-behind entry is refused by the cold tier for good and holds back its thread: list it with agent-state write-behind stuck.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'backlogStuck'
          metricNamespace: 'azure.applicationinsights'
          metricName: backlogStuckMetric
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
          skipMetricValidation: true
        }
      ]
    }
    actions: actions
  }
}

resource healthTest 'Microsoft.Insights/webtests@2022-06-15' = if (availabilityTestEnabled) {
  name: '${namePrefix}-health'
  location: location
  // The hidden-link tag ties the test to its Application Insights component.
  tags: union(tags, {
    'hidden-link:${applicationInsightsId}': 'Resource'
  })
  kind: 'standard'
  properties: {
    SyntheticMonitorId: '${namePrefix}-health'
    Name: 'GET /api/health'
    Kind: 'standard'
    Enabled: true
    Frequency: 900
    Timeout: 30
    RetryEnabled: true
    Locations: [
      {
        Id: 'us-va-ash-azr'
      }
      {
        Id: 'emea-nl-ams-azr'
      }
      {
        Id: 'apac-sg-sin-azr'
      }
    ]
    Request: {
      RequestUrl: '${functionAppUri}/api/health'
      HttpVerb: 'GET'
      ParseDependentRequests: false
    }
    ValidationRules: {
      ExpectedHttpStatusCode: healthExpectedStatus
      SSLCheck: true
      SSLCertRemainingLifetimeCheck: 7
    }
  }
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = if (workbookEnabled) {
  name: guid(applicationInsightsId, 'agent-state-operations')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'agent-state operations'
    category: 'workbook'
    sourceId: applicationInsightsId
    serializedData: loadTextContent('../workbooks/operations.workbook.json')
  }
}

output workbookId string = workbookEnabled ? workbook.id : ''
