//! The event ring and its budget: the controller takes the ring to read it, refills the
//! per-CPU budget several times a second, and reads how many events the kernel suppressed.

use aya::maps::{MapData, PerCpuArray, PerCpuValues, RingBuf};
use enforcer_common::{EventBudget, map_names};

use super::{Datapath, DatapathError, map_error};

impl Datapath {
    /// The event ring, taken out of the datapath for its reader (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let name = map_names::EVENTS;
        let map = self.maps.remove(name).ok_or(DatapathError::Map {
            name,
            source: "the event ring was taken already".into(),
        })?;
        RingBuf::try_from(map).map_err(map_error(name))
    }

    /// Sets every CPU's event budget: `per_cpu` events until the next refill, or (`None`) no
    /// events at all.
    pub fn set_event_budget(&mut self, per_cpu: Option<u32>) -> Result<(), DatapathError> {
        let name = map_names::EVENT_BUDGET;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
            name,
            source: Box::new(e),
        })?;
        let budget = EventBudget {
            enabled: u32::from(per_cpu.is_some()),
            tokens: per_cpu.unwrap_or(0),
        };
        let values = PerCpuValues::try_from(vec![budget; cpus]).map_err(map_error(name))?;
        let mut array: PerCpuArray<&mut MapData, EventBudget> = self.typed_mut(name)?;
        array.set(0, values, 0).map_err(map_error(name))
    }

    /// Events the kernel did not raise (budget spent, a source over its rate, the ring full),
    /// summed over CPUs since the maps were made.
    pub fn events_suppressed(&self) -> Result<u64, DatapathError> {
        let name = map_names::EVENT_SUPPRESSED;
        let array: PerCpuArray<&MapData, u64> = self.typed(name)?;
        let values = array.get(&0, 0).map_err(map_error(name))?;
        Ok(values.iter().sum())
    }
}
