-- Argo CD health check for kubetrain.dev Sweep; argocd-cm key
-- resource.customizations.health.kubetrain.dev_Sweep (charts/kubetrain/argocd/argocd-cm.yaml).
-- A Sweep's status has the TrainingRun's shape (phase, kstatus conditions,
-- observedGeneration): Progressing while trials are pending or training, Healthy once the
-- planned trials are done and one completed (the best is its result), Degraded when too many
-- trials failed or none completed, Suspended while spec.suspend holds it.
local hs = {}

local function condition(conditionType)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function messageOf(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetrain operator to pick up the sweep"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local phase = obj.status.phase
local ready = condition("Ready")
local failed = condition("Failed")
local suspended = condition("Suspended")

if isTrue(failed) or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = messageOf(failed, messageOf(ready, "Failed"))
  return hs
end
if isTrue(suspended) or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = messageOf(suspended, "Suspended")
  return hs
end
if isTrue(ready) or phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = messageOf(ready, "Succeeded")
  return hs
end

-- Pending or Running: the operator's message counts the trials ("3/6 trials done: ...");
-- without one, say how many are done.
hs.status = "Progressing"
local fallback = ""
if obj.status.progress ~= nil then
  fallback = obj.status.progress .. " trials done"
end
hs.message = phase .. ": " .. messageOf(ready, fallback)
return hs
